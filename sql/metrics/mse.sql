-- metric: mse
-- description: Mean squared error, mean of (pred - target)^2.
-- stats
SELECT count(*) AS n, sum((target - pred) * (target - pred)) AS sse FROM input;
-- final
SELECT sse / nullif(n, 0) AS value FROM merged;
