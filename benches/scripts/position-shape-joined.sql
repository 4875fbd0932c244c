-- BEGIN, the UPDATE, COMMIT and the position query with one Sync: the shape that would
-- give an autocommit write its position in the same answer (benches/autocommit-position.sh).
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
\startpipeline
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
COMMIT;
SELECT pg_catalog.pg_current_wal_insert_lsn();
\endpipeline
