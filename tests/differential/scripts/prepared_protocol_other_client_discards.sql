-- One client's DISCARD ALL and DEALLOCATE ALL end its own prepared statements, not the
-- protocol-level statements of another client that uses the same server connection.
-- client b
-- prepare q
select $1::int * 3 as triple;
-- execute q 1
-- client a
DISCARD ALL;
-- client b
-- execute q 2
-- client a
DEALLOCATE ALL;
-- client b
-- execute q 3
