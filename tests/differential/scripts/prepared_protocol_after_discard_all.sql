-- DISCARD ALL deallocates the session's protocol-level prepared statements too.
-- client a
-- prepare q
select $1::int * 10 as tenfold;
-- execute q 2
DISCARD ALL;
-- execute q 3
-- client b
select 1 as b_runs;
-- client a
-- prepare r
select 'fresh'::text as t;
-- execute r
