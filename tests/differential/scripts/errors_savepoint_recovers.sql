-- ROLLBACK TO SAVEPOINT recovers a failed transaction; what came before stays.
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
BEGIN;
INSERT INTO t VALUES (1);
SAVEPOINT s;
INSERT INTO t VALUES (2);
select 1/0;
ROLLBACK TO SAVEPOINT s;
INSERT INTO t VALUES (3);
RELEASE SAVEPOINT s;
ROLLBACK TO SAVEPOINT s;
COMMIT;
-- client b
select x from t order by x;
