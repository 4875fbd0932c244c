-- ROLLBACK PREPARED, unknown identifiers, PREPARE TRANSACTION outside a transaction and
-- in a failed one.
-- setup SET ROLE app;
-- setup CREATE TABLE ledger (id int, note text);
-- client a
BEGIN;
INSERT INTO ledger VALUES (2, 'to be rolled back');
PREPARE TRANSACTION 'diff-g2';
-- client b
ROLLBACK PREPARED 'diff-g2';
select count(*) from ledger;
COMMIT PREPARED 'diff-nope';
-- client a
PREPARE TRANSACTION 'diff-g3';
BEGIN;
select 1/0;
PREPARE TRANSACTION 'diff-g4';
select gid from pg_prepared_xacts where database = current_database();
BEGIN;
PREPARE TRANSACTION 'diff-g5';
-- client b
COMMIT PREPARED 'diff-g5';
-- client a
select 'a runs' as a;
