-- metric: count
-- description: Number of rows where both pred and target are present (not NULL, not NaN).
-- stats
SELECT count(*) AS n FROM input;
-- final
SELECT n AS value FROM merged;
