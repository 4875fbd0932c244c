-- set_config(name, value, false) sets the session value like SET; with is_local = true
-- outside a transaction it changes nothing after the statement.
-- client a
select set_config('work_mem', '8MB', false);
show work_mem;
-- client b
show work_mem;
-- client a
show work_mem;
select set_config('work_mem', '16MB', true);
show work_mem;
