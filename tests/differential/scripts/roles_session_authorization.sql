-- SET SESSION AUTHORIZATION as the superuser: session_user and current_user change, with
-- ParameterStatus session_authorization and is_superuser; DEFAULT and RESET return.
-- roles u1 u2
-- client a as postgres
SET SESSION AUTHORIZATION u1;
select current_user, session_user;
-- client b as postgres
select current_user, session_user;
-- client a
select current_user, session_user;
SET SESSION AUTHORIZATION DEFAULT;
select current_user, session_user;
SET SESSION AUTHORIZATION u2;
-- client b
select current_user, session_user;
-- client a
RESET SESSION AUTHORIZATION;
select current_user, session_user;
