-- PREPARE TRANSACTION ends the client's transaction; another client commits it.
-- setup SET ROLE app;
-- setup CREATE TABLE ledger (id int, note text);
-- client a
BEGIN;
INSERT INTO ledger VALUES (1, 'prepared by a');
PREPARE TRANSACTION 'diff-g1';
select count(*) from ledger;
-- client b
select gid from pg_prepared_xacts where database = current_database();
COMMIT PREPARED 'diff-g1';
select * from ledger;
-- client a
select * from ledger;
select count(*) from pg_prepared_xacts where database = current_database();
