-- F7 transfer: per RL cell and benchmark other than the primary one, pass@1 before and after RL.
WITH primary_benchmark AS (
    SELECT json_extract_string(value, '$[0]') AS benchmark FROM meta WHERE key = 'benchmarks'
),
last AS (
    SELECT mixture, scale, algo, kl, seed, benchmark, max(step) AS step FROM eval_curves GROUP BY ALL
)
SELECT l.mixture, l.scale, l.algo, l.kl, l.seed, l.benchmark, b.pass1 AS pass1_before, a.pass1 AS pass1_after,
       a.pass1 - b.pass1 AS pass1_change
FROM last l
JOIN eval_curves a USING (mixture, scale, algo, kl, seed, benchmark, step)
JOIN eval_curves b ON b.mixture = l.mixture AND b.scale = l.scale AND b.algo = l.algo AND b.kl = l.kl
                  AND b.seed = l.seed AND b.benchmark = l.benchmark AND b.step = 0
WHERE l.benchmark <> (SELECT benchmark FROM primary_benchmark)
ORDER BY l.mixture, l.scale, l.algo, l.kl, l.seed, l.benchmark;
