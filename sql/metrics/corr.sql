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
-- A variance below 1e-12 of the sum of squares it comes from is rounding noise: that column is
-- constant and the correlation is undefined (NULL).
SELECT
    CASE WHEN spp - sp * sp / n > 1e-12 * spp AND stt - st * st / n > 1e-12 * stt
         THEN (spt - sp * st / n) / sqrt((spp - sp * sp / n) * (stt - st * st / n))
    END AS value
FROM merged;
