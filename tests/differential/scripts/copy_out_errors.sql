-- A COPY TO STDOUT that fails part way, and one of a table that does not exist.
-- client a
-- copy out
COPY (select 1 / (g - 3) from generate_series(1, 5) g) TO STDOUT;
select 'after the failed copy' as a;
-- copy out
COPY no_such_table TO STDOUT;
BEGIN;
-- copy out
COPY (select 1 / 0) TO STDOUT;
select 1;
ROLLBACK;
-- client b
select 'b runs' as b;
