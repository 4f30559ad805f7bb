-- pass@1, pass@k and maj@k before RL (pretrained model, step 0) and after RL (last checkpoint), per cell and benchmark.
WITH last AS (
    SELECT mixture, scale, algo, kl, seed, benchmark, max(step) AS step
    FROM eval_curves
    GROUP BY mixture, scale, algo, kl, seed, benchmark
)
SELECT l.mixture, l.scale, l.algo, l.kl, l.seed, l.benchmark, l.step AS final_step, a.k,
       b.pass1 AS pass1_before, a.pass1 AS pass1_after, a.pass1 - b.pass1 AS pass1_gain,
       b.pass_k AS pass_k_before, a.pass_k AS pass_k_after,
       b.maj_k AS maj_k_before, a.maj_k AS maj_k_after
FROM last l
JOIN eval_curves a
  ON a.mixture = l.mixture AND a.scale = l.scale AND a.algo = l.algo AND a.kl = l.kl
 AND a.seed = l.seed AND a.benchmark = l.benchmark AND a.step = l.step
LEFT JOIN eval_curves b
  ON b.mixture = l.mixture AND b.scale = l.scale AND b.algo = l.algo AND b.kl = l.kl
 AND b.seed = l.seed AND b.benchmark = l.benchmark AND b.step = 0
ORDER BY l.mixture, l.scale, l.algo, l.kl, l.seed, l.benchmark;
