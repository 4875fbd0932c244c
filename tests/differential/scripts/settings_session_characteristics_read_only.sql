-- SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY makes the client's later
-- transactions read-only, and nobody else's.
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY;
insert into t values (1);
-- client b
insert into t values (2);
show default_transaction_read_only;
-- client a
insert into t values (3);
SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE;
insert into t values (4);
select count(*) from t;
