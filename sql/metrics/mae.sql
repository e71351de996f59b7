-- metric: mae
-- description: Mean absolute error, mean of |pred - target|.
-- stats
SELECT count(*) AS n, sum(abs(target - pred)) AS sae FROM input;
-- final
SELECT sae / nullif(n, 0) AS value FROM merged;
