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
SELECT 1 - sse / nullif(stt - st * st / n, 0) AS value FROM merged;
