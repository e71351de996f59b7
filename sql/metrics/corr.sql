-- metric: corr
-- description: Pearson correlation of pred and target (the information coefficient, IC).
-- stats
SELECT
    count(*) AS n,
    sum(pred_c) AS sp,
    sum(target_c) AS st,
    sum(pred_c * pred_c) AS spp,
    sum(target_c * target_c) AS stt,
    sum(pred_c * target_c) AS spt
FROM input;
-- final
SELECT (spt - sp * st / n) / nullif(sqrt((spp - sp * sp / n) * (stt - st * st / n)), 0) AS value
FROM merged;
