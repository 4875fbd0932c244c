-- SQL DEALLOCATE ALL also deallocates protocol-level prepared statements.
-- client a
-- prepare q
select 1 as one;
-- execute q
DEALLOCATE ALL;
-- execute q
-- client b
select 2 as two;
