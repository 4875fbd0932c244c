-- statement_timeout cancels the client's own long statements and nobody else's.
-- client a
SET statement_timeout = '50ms';
select pg_sleep(2);
-- client b
select pg_sleep(0.3);
-- client a
select pg_sleep(2);
RESET statement_timeout;
select pg_sleep(0.1);
