-- ROLLBACK TO SAVEPOINT undoes a SET made after the savepoint; the transaction commits the
-- value set before it.
-- client a
BEGIN;
SET search_path = 'a1';
SAVEPOINT s1;
SET search_path = 'a2';
show search_path;
ROLLBACK TO SAVEPOINT s1;
show search_path;
COMMIT;
-- client b
show search_path;
-- client a
show search_path;
