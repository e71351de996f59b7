-- metric: count
-- description: Number of rows where both pred and target are finite (not NULL, NaN or ±infinite).
-- stats
SELECT count(*) AS n FROM input;
-- final
SELECT n AS value FROM merged;
