-- A client that reconnects starts a new session: nothing of the old one's settings.
-- client a
SET work_mem = '12MB';
SET myapp.x = 'old';
-- client a closes
-- client a
show work_mem;
select current_setting('myapp.x', true);
-- client b
show work_mem;
