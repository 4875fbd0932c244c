-- A temporary table created and dropped again leaves nothing: another client of the same
-- user gets the (only) server connection.
-- client a
CREATE TEMP TABLE t1 (x int);
INSERT INTO t1 VALUES (1);
select count(*) from t1;
DROP TABLE t1;
-- client b
select 'b runs' as b;
-- client a
select 'a runs' as a;
