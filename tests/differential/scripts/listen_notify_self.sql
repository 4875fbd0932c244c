-- A session hears its own notifications, at the end of the notifying transaction.
-- client a
LISTEN me;
NOTIFY me, 'to myself';
select pg_notify('me', 'via function');
BEGIN;
NOTIFY me, 'in a transaction';
select 'still in the transaction' as a;
COMMIT;
UNLISTEN me;
NOTIFY me, 'not heard';
select 'done' as a;
