-- RELEASE SAVEPOINT keeps a SET made after the savepoint; a SET LOCAL rolled back to a
-- savepoint is gone, and an error rolled back to a savepoint keeps the SET before it.
-- client a
BEGIN;
SAVEPOINT s1;
SET work_mem = '9MB';
RELEASE SAVEPOINT s1;
COMMIT;
-- client b
show work_mem;
-- client a
show work_mem;
BEGIN;
SET extra_float_digits = 2;
SAVEPOINT s2;
SET LOCAL extra_float_digits = 3;
select 1/0;
ROLLBACK TO SAVEPOINT s2;
show extra_float_digits;
COMMIT;
-- client b
show extra_float_digits;
-- client a
show extra_float_digits;
