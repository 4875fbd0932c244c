-- Notifications are sent when the notifying transaction commits, duplicates folded, and
-- never when it rolls back. (Pool of two.)
-- pool_size 2
-- client a
LISTEN ev;
-- client b
BEGIN;
NOTIFY ev, 'one';
NOTIFY ev, 'one';
NOTIFY ev, 'two';
-- client a
select 'poll 1' as a;
-- client b
COMMIT;
-- client a
select 'poll 2' as a;
-- client b
BEGIN;
NOTIFY ev, 'rolled back';
ROLLBACK;
-- client a
select 'poll 3' as a;
