-- A WITH HOLD cursor that was closed leaves nothing: another client of the same user gets
-- the (only) server connection.
-- client a
BEGIN;
DECLARE c CURSOR WITH HOLD FOR select 1 as x;
COMMIT;
FETCH ALL FROM c;
CLOSE c;
-- client b
select 'b runs' as b;
-- client a
select 'a runs' as a;
