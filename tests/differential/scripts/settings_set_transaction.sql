-- SET TRANSACTION and BEGIN ISOLATION LEVEL apply to one transaction only; outside a
-- transaction SET TRANSACTION warns and does nothing.
-- client a
BEGIN;
SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;
show transaction_isolation;
COMMIT;
show transaction_isolation;
-- client b
show transaction_isolation;
-- client a
BEGIN ISOLATION LEVEL REPEATABLE READ;
show transaction_isolation;
COMMIT;
SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;
show transaction_isolation;
