-- After DEALLOCATE nothing of the session's SQL PREPARE is left: another client of the same
-- user gets the (only) server connection.
-- client a
PREPARE p AS select 1 as one;
EXECUTE p;
DEALLOCATE p;
-- client b
select 2 as two;
-- client a
EXECUTE p;
