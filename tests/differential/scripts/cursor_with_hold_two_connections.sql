-- A WITH HOLD cursor outlives its transaction and belongs to its session. (Pool of two:
-- the cursor pins a to one connection, b takes turns on the other.)
-- pool_size 2
-- client a
BEGIN;
DECLARE c CURSOR WITH HOLD FOR select g from generate_series(1, 5) g;
COMMIT;
FETCH 2 FROM c;
-- client b
FETCH 1 FROM c;
select name from pg_cursors;
-- client a
FETCH 2 FROM c;
select name, is_holdable from pg_cursors;
CLOSE c;
FETCH 1 FROM c;
