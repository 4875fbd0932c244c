-- DISCARD TEMP drops the session's temporary tables.
-- client a
CREATE TEMP TABLE t1 (x int);
INSERT INTO t1 VALUES (1);
DISCARD TEMP;
select count(*) from t1;
-- client b
select 'b runs' as b;
