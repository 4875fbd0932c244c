-- standard_conforming_strings changes how the server reads string literals: the other
-- client's literal must not be read with the first client's setting.
-- client a
SET standard_conforming_strings = off;
select 'a\\b' as s;
-- client b
select 'a\\b' as s;
-- client a
select 'a\\b' as s;
