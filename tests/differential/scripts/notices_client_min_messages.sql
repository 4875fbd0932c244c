-- client_min_messages decides which notices reach the client that set it.
-- client a
SET client_min_messages = 'warning';
DO $$ BEGIN RAISE NOTICE 'hidden from a'; RAISE WARNING 'shown to a'; END $$;
-- client b
DO $$ BEGIN RAISE NOTICE 'shown to b'; END $$;
-- client a
DO $$ BEGIN RAISE NOTICE 'still hidden from a'; END $$;
RESET client_min_messages;
DO $$ BEGIN RAISE NOTICE 'shown to a now'; END $$;
