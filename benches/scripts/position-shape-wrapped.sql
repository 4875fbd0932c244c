-- The UPDATE between BEGIN and COMMIT, all three with one Sync (benches/autocommit-position.sh).
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
\startpipeline
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
COMMIT;
\endpipeline
