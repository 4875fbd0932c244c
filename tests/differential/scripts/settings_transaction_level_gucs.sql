-- transaction_isolation and transaction_read_only set outside a transaction block apply
-- to that statement's implicit transaction only.
-- client a
SET transaction_isolation = 'serializable';
SET transaction_read_only = on;
show transaction_isolation;
-- client b
show transaction_isolation;
show transaction_read_only;
-- client a
show transaction_isolation;
BEGIN;
show transaction_isolation;
show transaction_read_only;
COMMIT;
