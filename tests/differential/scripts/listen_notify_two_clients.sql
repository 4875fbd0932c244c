-- LISTEN/NOTIFY between two clients: a hears b's notifications on its channel (with the
-- next statement it runs at the latest), not other channels, and nothing after UNLISTEN.
-- (Pool of two: LISTEN pins a to one connection, b takes turns on the other.)
-- pool_size 2
-- client a
LISTEN jobs;
-- client b
NOTIFY jobs, 'first';
select pg_notify('jobs', 'second');
NOTIFY other_channel, 'not for a';
-- client a
select 'a polls' as a;
-- client b
NOTIFY jobs;
-- client a
select 'a polls' as a;
UNLISTEN *;
-- client b
NOTIFY jobs, 'after unlisten';
-- client a
select 'a polls again' as a;
