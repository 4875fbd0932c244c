-- A temporary table belongs to its session: another client does not see it and may create
-- its own with the same name. (Pool of two: a's temporary table pins it to one connection,
-- b takes turns on the other.)
-- pool_size 2
-- client a
CREATE TEMP TABLE tt (x int);
INSERT INTO tt VALUES (1), (2);
-- client b
select count(*) from tt;
CREATE TEMP TABLE tt (x int);
INSERT INTO tt VALUES (10);
-- client a
select sum(x) from tt;
-- client b
select sum(x) from tt;
-- client a
DROP TABLE tt;
select count(*) from tt;
