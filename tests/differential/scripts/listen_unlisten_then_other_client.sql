-- LISTEN then UNLISTEN leaves nothing: another client of the same user gets the (only)
-- server connection.
-- client a
LISTEN x;
UNLISTEN x;
-- client b
select 'b runs' as b;
-- client a
select 'a runs' as a;
