-- Several statements in one Query run as one implicit transaction: an error rolls back
-- all of it, a SET included; BEGIN/COMMIT inside the string work.
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
select 1 as one; select 2 as two;
insert into t values (1); select 1/0; insert into t values (2);
select count(*) from t;
BEGIN; insert into t values (3); COMMIT; select count(*) from t;
SET work_mem = '3MB'; select 1/0;
show work_mem;
-- client b
show work_mem;
-- client a
SET work_mem = '5MB'; select 'set and select' as a;
-- client b
show work_mem;
-- client a
show work_mem;
