-- Custom settings (myapp.x) belong to the session that set them: another session has no
-- such setting at all (SHOW fails, current_setting(..., true) is NULL).
-- client a
SET myapp.tenant = 'acme';
select current_setting('myapp.tenant');
-- client b
select current_setting('myapp.tenant', true);
show myapp.tenant;
-- client a
show myapp.tenant;
RESET myapp.tenant;
show myapp.tenant;
select current_setting('myapp.tenant', true);
