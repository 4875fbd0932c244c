-- `options=-c search_path=...` in the StartupMessage.
-- setup SET ROLE app;
-- setup CREATE SCHEMA s1;
-- setup CREATE TABLE public.whereami (v text);
-- setup INSERT INTO public.whereami VALUES ('public');
-- setup CREATE TABLE s1.whereami (v text);
-- setup INSERT INTO s1.whereami VALUES ('s1');
-- client a startup options=-c search_path=s1,public
select v from whereami;
-- client b
select v from whereami;
-- client a
select v from whereami;
SET search_path = public;
select v from whereami;
RESET search_path;
select v from whereami;
