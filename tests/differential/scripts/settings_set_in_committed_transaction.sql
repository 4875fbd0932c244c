-- A SET inside a transaction that commits stays for the session.
-- client a
BEGIN;
SET application_name = 'set-in-transaction';
SET work_mem = '10MB';
COMMIT;
-- client b
show application_name;
show work_mem;
-- client a
show application_name;
show work_mem;
