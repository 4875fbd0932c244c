-- Issue 10, case 2: SET SESSION CHARACTERISTICS changes the session's default
-- transaction mode; another client's turn must not see it, and the first client keeps it.
-- client a
SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ;
-- client b
show default_transaction_isolation;
-- client a
show default_transaction_isolation;
BEGIN;
show transaction_isolation;
COMMIT;
