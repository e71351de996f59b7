-- metric: rmse
-- description: Root mean squared error, sqrt(mse).
-- stats
SELECT count(*) AS n, sum((target - pred) * (target - pred)) AS sse FROM input;
-- final
SELECT sqrt(sse / nullif(n, 0)) AS value FROM merged;
