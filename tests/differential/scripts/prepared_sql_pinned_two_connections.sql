-- SQL PREPARE belongs to the session: another client cannot EXECUTE it and may prepare
-- the same name for itself. (Pool of two: a's prepared statement pins it to one
-- connection, b takes turns on the other.)
-- pool_size 2
-- client a
PREPARE p(int) AS select $1 * 2 as doubled;
EXECUTE p(21);
-- client b
EXECUTE p(1);
PREPARE p(text) AS select $1 || '!' as shout;
EXECUTE p('b');
-- client a
EXECUTE p(4);
select name, statement, from_sql from pg_prepared_statements order by name;
DEALLOCATE p;
EXECUTE p(1);
-- client b
EXECUTE p('again');
DEALLOCATE ALL;
EXECUTE p('gone');
