-- A temporary table ON COMMIT DROP is gone after its transaction: nothing of the session
-- is left for another client to see or wait for.
-- client a
BEGIN;
CREATE TEMP TABLE scratch (x int) ON COMMIT DROP;
INSERT INTO scratch VALUES (1);
select count(*) from scratch;
COMMIT;
-- client b
select 1 as b_runs;
-- client a
select count(*) from scratch;
