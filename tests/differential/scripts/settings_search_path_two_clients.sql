-- search_path set by one client decides which table its unqualified names find; the
-- other client keeps the default, on the same server connection.
-- setup SET ROLE app;
-- setup CREATE SCHEMA s1;
-- setup CREATE TABLE public.whereami (v text);
-- setup INSERT INTO public.whereami VALUES ('public');
-- setup CREATE TABLE s1.whereami (v text);
-- setup INSERT INTO s1.whereami VALUES ('s1');
-- client a
SET search_path TO s1, public;
select v from whereami;
-- client b
select v from whereami;
show search_path;
-- client a
select v from whereami;
show search_path;
RESET search_path;
-- client b
SET search_path = s1;
-- client a
select v from whereami;
show search_path;
-- client b
select v from whereami;
