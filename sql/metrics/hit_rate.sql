-- metric: hit_rate
-- description: Fraction of rows where sign(pred) = sign(target) (a zero matches only a zero).
-- stats
SELECT
    count(*) AS n,
    sum(CAST(sign(pred) = sign(target) AS INTEGER)) AS hits
FROM input;
-- final
SELECT hits / nullif(n, 0) AS value FROM merged;
