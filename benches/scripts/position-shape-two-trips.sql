-- The UPDATE, then the position query in a round trip of its own (benches/autocommit-position.sh).
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT pg_catalog.pg_current_wal_insert_lsn();
