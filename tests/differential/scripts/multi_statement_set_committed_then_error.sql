-- In one Query string, a SET in a transaction that COMMITs inside the string stays even
-- when a later statement of the string fails; a SET in the failing implicit transaction
-- does not.
-- client a
BEGIN; SET work_mem = '3MB'; COMMIT; select 1/0;
show work_mem;
-- client b
show work_mem;
-- client a
show work_mem;
select 1 as one; SET work_mem = '6MB'; select 1/0;
show work_mem;
