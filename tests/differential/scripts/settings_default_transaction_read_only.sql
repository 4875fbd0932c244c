-- default_transaction_read_only is the client's: its writes fail, another client's do not.
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
SET default_transaction_read_only = on;
insert into t values (1);
-- client b
insert into t values (2);
-- client a
insert into t values (3);
select count(*) from t;
RESET default_transaction_read_only;
insert into t values (4);
select count(*) from t;
