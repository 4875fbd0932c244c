-- A setting changed inside a DO block (invisible to a statement classifier) is still the
-- session's. pgway keeps client a on its connection after the DO (it cannot see what the
-- block changed), so b needs a second one.
-- pool_size 2
-- client a
DO $$ BEGIN PERFORM set_config('search_path', 'pg_catalog, public', false); END $$;
show search_path;
-- client b
show search_path;
-- client a
show search_path;
