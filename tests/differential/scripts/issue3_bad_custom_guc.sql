-- Issue 10, case 3: a custom setting whose name is not two simple identifiers is refused
-- by PostgreSQL (ERROR 42602), so nothing is set for anyone.
-- client a
SET "custom.bad-guc" = 42;
-- client b
select 1 as b_runs;
-- client a
select current_setting('custom.bad-guc', true);
SET custom.good_guc = 42;
show custom.good_guc;
