-- A setting changed inside a DO block (invisible to a statement classifier) is still the
-- session's.
-- client a
DO $$ BEGIN PERFORM set_config('search_path', 'pg_catalog, public', false); END $$;
show search_path;
-- client b
show search_path;
-- client a
show search_path;
