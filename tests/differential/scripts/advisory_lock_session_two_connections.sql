-- Session advisory locks are held by the session that took them, until it unlocks.
-- (Pool of two: each client's lock pins it to its connection.)
-- pool_size 2
-- client a
select pg_advisory_lock(42);
-- client b
select pg_try_advisory_lock(42);
-- client a
select pg_advisory_unlock(42);
select pg_advisory_unlock(42);
-- client b
select pg_try_advisory_lock(42);
-- client a
select pg_try_advisory_lock(42);
-- client b
select pg_advisory_unlock_all();
-- client a
select pg_try_advisory_lock(42);
select objid, mode, granted from pg_locks where locktype = 'advisory' order by objid;
