-- After an error a transaction accepts nothing but ROLLBACK; COMMIT of a failed
-- transaction rolls back (tag ROLLBACK).
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
BEGIN;
INSERT INTO t VALUES (1);
select 1/0;
select 1;
ROLLBACK;
select count(*) from t;
-- client b
select count(*) from t;
-- client a
BEGIN;
INSERT INTO t VALUES (2);
select 1/0;
COMMIT;
-- client b
select count(*) from t;
-- client a
select count(*) from t;
