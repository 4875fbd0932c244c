-- A string with several transactions and a failing statement at the end: what committed
-- before the failure stays, what the failure rolled back does not; other clients see none
-- of it.
-- client a
BEGIN; SET work_mem = '3MB'; COMMIT; SET search_path = pg_catalog; select 1/0;
show work_mem;
show search_path;
BEGIN; SET work_mem = '5MB'; ROLLBACK; SET statement_timeout = '7s';
show work_mem;
show statement_timeout;
-- client b
show work_mem;
show statement_timeout;
-- client a
BEGIN; SET work_mem = '6MB'; COMMIT; BEGIN; SET statement_timeout = '9s'; select 1/0;
show work_mem;
ROLLBACK;
show work_mem;
show statement_timeout;
BEGIN; SET lock_timeout = '4s'; SAVEPOINT s; SET lock_timeout = '8s'; ROLLBACK TO s; COMMIT; select 1/0;
show lock_timeout;
-- client b
show work_mem;
show search_path;
show statement_timeout;
show lock_timeout;
