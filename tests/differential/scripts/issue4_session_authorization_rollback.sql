-- Issue 10, case 4, verbatim: one multi-statement string as the superuser. SET ROLE u9 fails
-- (u8 is not a member of u9), which aborts the string's implicit transaction, so nothing of
-- it stays. After another client's turn the first is still postgres with no role, and
-- DROP ROLE of a role the string named succeeds.
-- roles u8 u9 u10
-- client a as postgres
SET SESSION AUTHORIZATION u8; SET ROLE u9; BEGIN; SET SESSION AUTHORIZATION u10; ROLLBACK; RESET SESSION AUTHORIZATION;
-- client b as postgres
select current_user, session_user, current_setting('role');
-- client a
select current_user, current_setting('role');
DROP ROLE u8;
