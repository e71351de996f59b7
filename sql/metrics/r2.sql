-- metric: r2
-- description: Coefficient of determination 1 - SSE/SST, with SST about the target's own mean.
-- stats
SELECT
    count(*) AS n,
    sum((target - pred) * (target - pred)) AS sse,
    sum(target_c) AS st,
    sum(target_c * target_c) AS stt
FROM input;
-- final
-- SST below 1e-12 of the sum of squares it comes from is rounding noise: the target is constant
-- and R² is undefined (NULL).
SELECT CASE WHEN stt - st * st / n > 1e-12 * stt THEN 1 - sse / (stt - st * st / n) END AS value
FROM merged;
