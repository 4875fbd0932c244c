-- DISCARD SEQUENCES forgets currval/lastval; DISCARD PLANS and DISCARD TEMP change nothing
-- visible here.
-- setup SET ROLE app;
-- setup CREATE SEQUENCE seq;
-- client a
select nextval('seq');
DISCARD SEQUENCES;
select currval('seq');
DISCARD PLANS;
DISCARD TEMP;
-- client b
select nextval('seq');
-- client a
select lastval();
