-- SET ROLE changes current_user (and the owner of what the client creates) for that one
-- client; RESET ROLE and SET ROLE NONE end it.
-- roles u1
-- setup GRANT u1 TO app;
-- setup GRANT CREATE ON SCHEMA public TO u1;
-- client a
SET ROLE u1;
select current_user, session_user;
-- client b
select current_user, session_user;
create table b_owned (x int);
-- client a
select current_user;
create table a_owned (x int);
select tablename, tableowner from pg_tables where tablename in ('a_owned', 'b_owned') order by 1;
RESET ROLE;
select current_user;
SET ROLE u1;
SET ROLE NONE;
select current_user;
