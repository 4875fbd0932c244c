-- A COPY FROM STDIN with bad data fails as a whole; inside a transaction it leaves the
-- transaction failed.
-- setup SET ROLE app;
-- setup CREATE TABLE items (id int primary key, name text);
-- client a
-- copy in
COPY items FROM STDIN;
1	ok
two	bad
\.
select count(*) from items;
BEGIN;
-- copy in
COPY items FROM STDIN;
3	fine
\.
-- copy in
COPY items FROM STDIN;
oops
\.
select 1;
ROLLBACK;
-- client b
select count(*) from items;
-- copy in
COPY items FROM STDIN;
5	five
\.
select count(*) from items;
