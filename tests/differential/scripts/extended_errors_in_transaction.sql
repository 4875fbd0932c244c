-- Errors of extended-protocol statements inside and outside a transaction.
-- client a
BEGIN;
-- extended 1
select $1::int / 0;
-- extended
select 1;
ROLLBACK;
-- extended 'abc'
select $1::int;
-- client b
-- extended 5
select $1::int + 1;
-- client a
-- extended
select no_such_column;
-- extended
select 1 as works;
