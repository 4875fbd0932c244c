-- Settings that change how values are printed: IntervalStyle, extra_float_digits,
-- bytea_output.
-- client a
SET intervalstyle = 'iso_8601';
SET extra_float_digits = 0;
SET bytea_output = 'escape';
select interval '1 day 2 hours', 0.1::float8 + 0.2::float8, 'ab'::bytea;
-- client b
select interval '1 day 2 hours', 0.1::float8 + 0.2::float8, 'ab'::bytea;
-- client a
select interval '1 day 2 hours', 0.1::float8 + 0.2::float8, 'ab'::bytea;
