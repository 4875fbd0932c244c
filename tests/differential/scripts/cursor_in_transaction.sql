-- A plain cursor lives in its transaction; after COMMIT it is gone.
-- client a
BEGIN;
DECLARE c CURSOR FOR select g from generate_series(1, 5) g;
FETCH 2 FROM c;
FETCH 2 FROM c;
MOVE 1 IN c;
FETCH 2 FROM c;
CLOSE c;
COMMIT;
-- client b
select 'b runs' as b;
-- client a
FETCH 1 FROM c;
BEGIN;
DECLARE c2 CURSOR FOR select 1;
COMMIT;
FETCH 1 FROM c2;
