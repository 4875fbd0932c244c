-- A SET inside a transaction that rolls back (explicitly, or after an error) is undone,
-- and the client is told (ParameterStatus) of both changes.
-- client a
BEGIN;
SET timezone = 'Asia/Tokyo';
show timezone;
ROLLBACK;
show timezone;
-- client b
show timezone;
-- client a
BEGIN;
SET timezone = 'Europe/Paris';
select 1/0;
ROLLBACK;
show timezone;
select '2020-01-01 00:00:00+00'::timestamptz;
