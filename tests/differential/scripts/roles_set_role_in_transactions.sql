-- SET ROLE in a transaction that rolls back is undone; SET LOCAL ROLE ends with its
-- transaction; a RESET ROLE that rolls back leaves the role set.
-- roles u1
-- setup GRANT u1 TO app;
-- client a
BEGIN;
SET ROLE u1;
select current_user;
ROLLBACK;
select current_user;
-- client b
select current_user;
-- client a
BEGIN;
SET LOCAL ROLE u1;
select current_user;
COMMIT;
select current_user;
SET ROLE u1;
BEGIN;
RESET ROLE;
ROLLBACK;
select current_user;
-- client b
select current_user;
-- client a
select current_user;
