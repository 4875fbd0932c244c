-- client_encoding set with SET is the client's, reported with ParameterStatus.
-- client a
SET client_encoding = 'LATIN1';
select 'abc'::text, length('abc');
show client_encoding;
-- client b
show client_encoding;
-- client a
show client_encoding;
RESET client_encoding;
show client_encoding;
