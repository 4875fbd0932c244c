-- One UPDATE a transaction, sent outside BEGIN/COMMIT (autocommit), as a service that
-- writes a row per request does: benches/ab.sh SCRIPT=autocommit.
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
