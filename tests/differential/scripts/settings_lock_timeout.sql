-- lock_timeout survives another client's turn: a's locking read gives up after 100 ms
-- while md5user (another pool) holds the row.
-- setup SET ROLE app;
-- setup CREATE TABLE t (id int primary key, v text);
-- setup INSERT INTO t VALUES (1, 'one');
-- setup GRANT ALL ON t TO md5user;
-- client a
SET lock_timeout = '100ms';
-- client b
show lock_timeout;
-- client c as md5user
BEGIN;
UPDATE t SET v = 'locked' WHERE id = 1;
-- client a
select v from t where id = 1 for update;
-- client c
COMMIT;
-- client a
select v from t where id = 1 for update;
show lock_timeout;
