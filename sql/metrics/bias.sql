-- metric: bias
-- description: Mean error, mean of (pred - target); positive when predictions are too high.
-- stats
SELECT count(*) AS n, sum(pred - target) AS se FROM input;
-- final
SELECT se / nullif(n, 0) AS value FROM merged;
