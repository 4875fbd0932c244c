-- DISCARD ALL resets SET ROLE and SET SESSION AUTHORIZATION.
-- roles u1
-- setup GRANT u1 TO app;
-- client a
SET ROLE u1;
DISCARD ALL;
select current_user;
-- client b
select current_user;
-- client s as postgres
SET SESSION AUTHORIZATION u1;
DISCARD ALL;
select current_user, session_user;
-- client t as postgres
select current_user, session_user;
