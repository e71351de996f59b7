-- metric: hit_rate
-- description: Fraction of rows where sign(pred) = sign(target) (a zero matches only a zero).
-- stats
-- (sign agreement written with comparisons: the same result as sign(pred) = sign(target), cheaper)
SELECT
    count(*) AS n,
    sum(CAST((pred > 0) = (target > 0) AND (pred < 0) = (target < 0) AS INTEGER)) AS hits
FROM input;
-- final
SELECT hits / nullif(n, 0) AS value FROM merged;
