-- SET CONSTRAINTS lasts for one transaction; a deferred foreign key fails at COMMIT.
-- setup SET ROLE app;
-- setup CREATE TABLE parent (id int primary key);
-- setup CREATE TABLE child (pid int REFERENCES parent DEFERRABLE INITIALLY IMMEDIATE);
-- client a
BEGIN;
SET CONSTRAINTS ALL DEFERRED;
INSERT INTO child VALUES (1);
INSERT INTO parent VALUES (1);
COMMIT;
-- client b
BEGIN;
INSERT INTO child VALUES (2);
ROLLBACK;
-- client a
BEGIN;
SET CONSTRAINTS ALL DEFERRED;
INSERT INTO child VALUES (3);
COMMIT;
select count(*) from child;
