-- currval() and lastval() are the session's: another session has not called nextval().
-- setup SET ROLE app;
-- setup CREATE SEQUENCE seq;
-- client a
select nextval('seq');
-- client b
select lastval();
select currval('seq');
select nextval('seq');
-- client a
select currval('seq');
select lastval();
