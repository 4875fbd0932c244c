-- Empty queries and comment-only queries get EmptyQueryResponse.
-- client a
;
/* only a comment */;
select 1 as one;;
-- client b
select 'b runs' as b;
