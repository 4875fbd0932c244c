-- Transaction-level advisory locks end with the transaction; md5user (its own pool) sees
-- a's lock while a's transaction is open.
-- client a
BEGIN;
select pg_advisory_xact_lock(7);
-- client c as md5user
select pg_try_advisory_xact_lock(7);
-- client a
COMMIT;
-- client c
select pg_try_advisory_xact_lock(7);
-- client b
select pg_try_advisory_xact_lock(7);
-- client a
select pg_try_advisory_xact_lock(7);
