-- DISCARD ALL cannot run in a transaction block, nor in a multi-statement string (an
-- implicit transaction): the SET before it in the string is rolled back too.
-- client a
BEGIN;
DISCARD ALL;
ROLLBACK;
SET work_mem = '6MB'; DISCARD ALL;
show work_mem;
-- client b
show work_mem;
