-- Protocol-level named statements (Parse/Bind/Execute) of two clients with the same
-- client-side name, taking turns on one server connection.
-- client a
-- prepare q
select $1::int + 1 as next;
-- client b
-- prepare q
select $1::text || '!' as shout;
-- client a
-- execute q 41
-- client b
-- execute q 'hey'
-- client a
SET search_path = pg_catalog;
-- execute q 1
-- close q
-- client b
-- execute q 'again'
