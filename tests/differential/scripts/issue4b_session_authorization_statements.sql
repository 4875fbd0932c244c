-- Issue 10, case 4 as separate statements, with u8 a member of u9 so that every statement
-- succeeds: a SET SESSION AUTHORIZATION inside a rolled-back transaction is undone, RESET
-- SESSION AUTHORIZATION returns to postgres (and drops the role). The DROP ROLE of the role
-- that was the session's must succeed.
-- roles u8 u9 u10
-- setup GRANT u9 TO u8;
-- client a as postgres
SET SESSION AUTHORIZATION u8;
SET ROLE u9;
select current_user, session_user;
BEGIN;
SET SESSION AUTHORIZATION u10;
select current_user, session_user;
ROLLBACK;
select current_user, session_user;
RESET SESSION AUTHORIZATION;
-- client b as postgres
select current_user, session_user, current_setting('role');
-- client a
select current_user, session_user, current_setting('role');
DROP ROLE u8;
DROP ROLE u9;
