-- RESET returns to the value from the StartupMessage (parameters and options), not to the
-- server default.
-- client a startup TimeZone=America/New_York
-- client a startup options=-c work_mem=8MB -c search_path=custom
SET timezone = 'UTC';
SET work_mem = '1MB';
SET search_path = public;
RESET timezone;
RESET work_mem;
show timezone;
show work_mem;
-- client b
show timezone;
show work_mem;
show search_path;
-- client a
show search_path;
RESET search_path;
show search_path;
SET work_mem TO DEFAULT;
show work_mem;
