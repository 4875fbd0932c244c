-- The same statement text prepared by two clients with different search_paths: each
-- execution resolves names with the executing client's search_path (PostgreSQL re-parses
-- a prepared statement when search_path changed).
-- setup SET ROLE app;
-- setup CREATE SCHEMA s1;
-- setup CREATE TABLE public.whereami (v text);
-- setup INSERT INTO public.whereami VALUES ('public');
-- setup CREATE TABLE s1.whereami (v text);
-- setup INSERT INTO s1.whereami VALUES ('s1');
-- client a
SET search_path = s1, public;
-- prepare q
select v from whereami;
-- execute q
-- client b
-- prepare q
select v from whereami;
-- execute q
-- client a
-- execute q
-- client b
-- execute q
SET search_path = s1;
-- execute q
-- client a
RESET search_path;
-- execute q
