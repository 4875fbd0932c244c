-- Issue 10, case 1: a client whose StartupMessage sets DateStyle changes it with SET
-- (twice, one part each); after another client used the connection, the first client's
-- DateStyle must be what it set (direct: ISO, YMD).
-- client a startup DateStyle=Postgres, MDY
SET datestyle TO iso; SET datestyle TO ymd;
-- client b
select '1999-01-08'::date;
show datestyle;
-- client a
select '1999-01-08'::date;
show datestyle;
