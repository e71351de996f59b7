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
-- constant and the correlation is undefined (NULL); so it is when a sum overflowed (values near
-- 1e154 and beyond). The two square roots are taken apart, so their product neither overflows
-- (values of 1e150) nor underflows (1e-150); below ~1e-154 the sums of squares themselves are
-- subnormal and lose digits (1e-6 relative at 1e-160, NULL by 1e-170). Rounding can put |r| a
-- few ulps above 1, so the value is clamped to [-1, 1].
SELECT
    CASE WHEN spp - sp * sp / n > 1e-12 * spp AND stt - st * st / n > 1e-12 * stt
              AND isfinite(spp - sp * sp / n) AND isfinite(stt - st * st / n) AND isfinite(spt - sp * st / n)
         THEN greatest(-1.0, least(1.0,
                  (spt - sp * st / n) / (sqrt(spp - sp * sp / n) * sqrt(stt - st * st / n))))
    END AS value
FROM merged;
