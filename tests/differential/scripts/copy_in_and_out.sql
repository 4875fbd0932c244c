-- COPY FROM STDIN reads dates with the client's DateStyle; COPY TO STDOUT writes them with
-- the DateStyle of the client that runs it.
-- setup SET ROLE app;
-- setup CREATE TABLE items (id int primary key, name text, born date);
-- client a
SET datestyle = 'SQL, DMY';
-- copy in
COPY items FROM STDIN;
1	apple	31/12/1999
2	pear	01/02/2000
\.
-- client b
-- copy out
COPY items TO STDOUT;
-- client a
-- copy out
COPY (select * from items order by id) TO STDOUT WITH (FORMAT csv, HEADER);
select count(*) from items;
