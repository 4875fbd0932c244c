-- TimeZone from the StartupMessage, SET TIME ZONE forms, and LOCAL (back to the startup value).
-- client a startup TimeZone=America/New_York
select '2020-06-01 12:00:00+00'::timestamptz;
-- client b startup TimeZone=Asia/Kolkata
select '2020-06-01 12:00:00+00'::timestamptz;
-- client a
select '2020-06-01 12:00:00+00'::timestamptz;
SET TIME ZONE 'Europe/Berlin';
SET TIME ZONE LOCAL;
show timezone;
-- client b
select '2020-06-01 12:00:00+00'::timestamptz;
-- client a
SET TIME ZONE INTERVAL '+02:30' HOUR TO MINUTE;
show timezone;
select '2020-06-01 12:00:00+00'::timestamptz;
-- client b
show timezone;
