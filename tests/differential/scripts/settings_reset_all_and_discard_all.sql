-- RESET ALL and DISCARD ALL return to the startup values.
-- client a startup DateStyle=SQL, DMY
-- client a startup application_name=startup-app
SET datestyle = 'ISO, YMD';
SET application_name = 'changed';
SET work_mem = '2MB';
RESET ALL;
show datestyle;
show application_name;
show work_mem;
-- client b
show datestyle;
show application_name;
-- client a
SET datestyle = 'German';
SET extra_float_digits = 0;
DISCARD ALL;
show datestyle;
show extra_float_digits;
-- client b
show datestyle;
-- client a
select '2000-12-31'::date;
