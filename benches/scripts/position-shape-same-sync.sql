-- The UPDATE and the position query with one Sync, in one transaction: the position comes
-- before the commit record, so this shape cannot keep read-your-writes; it prices the
-- query's own execution (benches/autocommit-position.sh).
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
\startpipeline
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT pg_catalog.pg_current_wal_insert_lsn();
\endpipeline
