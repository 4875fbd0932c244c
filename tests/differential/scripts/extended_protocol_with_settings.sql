-- Unnamed extended-protocol statements with text parameters see the client's settings.
-- client a
SET datestyle = 'German';
-- extended '1999-01-08'
select $1::date::text as d;
-- client b
-- extended '1999-01-08'
select $1::date::text as d;
-- client a
-- extended 'x' NULL
select $1::text as t, $2::int as n;
-- extended
select 1/0;
-- extended '2000-02-29'
select $1::date::text as d;
