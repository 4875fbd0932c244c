-- A session advisory lock taken and released leaves nothing: another client of the same
-- user gets the (only) server connection.
-- client a
select pg_advisory_lock(5);
select pg_advisory_unlock(5);
-- client b
select pg_try_advisory_lock(5);
select pg_advisory_unlock(5);
-- client a
select 'a runs' as a;
