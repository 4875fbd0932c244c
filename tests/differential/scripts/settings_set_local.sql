-- SET LOCAL lasts until the end of its transaction; outside a transaction it only warns.
-- client a
SET work_mem = '8MB';
BEGIN;
SET LOCAL work_mem = '16MB';
SET LOCAL statement_timeout = '1h';
show work_mem;
COMMIT;
show work_mem;
show statement_timeout;
SET LOCAL work_mem = '32MB';
show work_mem;
-- client b
show work_mem;
show statement_timeout;
-- client a
show work_mem;
