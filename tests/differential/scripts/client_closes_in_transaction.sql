-- A client that disconnects inside a transaction: its transaction rolls back, and its
-- SET LOCAL does not reach the next client.
-- setup SET ROLE app;
-- setup CREATE TABLE t (x int);
-- client a
BEGIN;
INSERT INTO t VALUES (1);
SET LOCAL work_mem = '11MB';
-- client a closes
-- client b
select count(*) from t;
show work_mem;
