-- RESET ALL and a SET in one string, and a RESET whose server default is already in force:
-- the client is told its startup values, and keeps what the string set after the reset.
-- client a startup DateStyle=SQL, DMY
-- client a startup TimeZone=America/New_York
SET datestyle = 'Postgres, MDY';
RESET ALL; SET datestyle = 'German';
show datestyle;
select '2000-12-31'::date;
-- client b
show datestyle;
select '2000-12-31'::date;
-- client a
show datestyle;
SET TIME ZONE 'Etc/UTC';
show timezone;
RESET timezone;
show timezone;
select '2000-01-01 12:00+00'::timestamptz;
-- client b
show timezone;
-- client a
BEGIN; RESET timezone; SET TIME ZONE 'Europe/Paris'; COMMIT;
show timezone;
BEGIN; RESET ALL; ROLLBACK;
show datestyle;
show timezone;
