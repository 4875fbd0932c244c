-- pg_prepared_statements shows the session's own prepared statements and nobody else's.
-- client a
-- prepare q
select $1::int as n;
-- execute q 1
-- client b
select statement, from_sql from pg_prepared_statements order by statement;
-- client a
select statement, from_sql from pg_prepared_statements order by statement;
