-- Transaction commands out of place warn (no error) and say what they did.
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
ROLLBACK;
COMMIT;
BEGIN;
BEGIN;
COMMIT;
END;
ABORT;
START TRANSACTION READ ONLY;
insert into t values (1);
ROLLBACK;
SAVEPOINT s;
-- client b
select count(*) from t;
