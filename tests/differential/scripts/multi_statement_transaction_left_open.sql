-- A Query string may open a transaction and leave it open; the next statements are in it.
-- setup SET ROLE app;
-- setup CREATE SCHEMA s1;
-- setup CREATE TABLE public.whereami (v text);
-- setup INSERT INTO public.whereami VALUES ('public');
-- setup CREATE TABLE s1.whereami (v text);
-- setup INSERT INTO s1.whereami VALUES ('s1');
-- client a
BEGIN; SET search_path = s1; select v from whereami;
select v from whereami;
COMMIT;
-- client b
select v from whereami;
-- client a
select v from whereami;
select 1 as one; BEGIN;
SET LOCAL work_mem = '7MB'; show work_mem;
COMMIT; show work_mem;
