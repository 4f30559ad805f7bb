-- Which format won in each RL cell (primary benchmark): the most common format at the last checkpoint, its share and accuracy before RL, and whether it was already the majority.
WITH primary_benchmark AS (
    SELECT json_extract_string(value, '$[0]') AS benchmark FROM meta WHERE key = 'benchmarks'
),
long AS (
    UNPIVOT (SELECT mixture, scale, algo, kl, seed, step, share_tinygsm, share_omi1, share_text,
                    acc_tinygsm, acc_omi1, acc_text
             FROM eval_curves WHERE benchmark = (SELECT benchmark FROM primary_benchmark))
    ON (share_tinygsm, acc_tinygsm) AS tinygsm, (share_omi1, acc_omi1) AS omi1, (share_text, acc_text) AS text
    INTO NAME format VALUE share, acc
),
last AS (
    SELECT mixture, scale, algo, kl, seed, max(step) AS step FROM long GROUP BY mixture, scale, algo, kl, seed
),
final AS (
    SELECT l.mixture, l.scale, l.algo, l.kl, l.seed, l.step,
           arg_max(g.format, g.share) AS winner, max(g.share) AS share_after
    FROM last l JOIN long g USING (mixture, scale, algo, kl, seed, step)
    GROUP BY l.mixture, l.scale, l.algo, l.kl, l.seed, l.step
),
start AS (
    SELECT mixture, scale, algo, kl, seed, arg_max(format, share) AS majority_before
    FROM long WHERE step = 0 GROUP BY mixture, scale, algo, kl, seed
)
SELECT f.mixture, f.scale, f.algo, f.kl, f.seed, f.step AS final_step, f.winner, f.share_after,
       b.share AS share_before, b.acc AS acc_before, s.majority_before,
       f.winner = s.majority_before AS winner_was_majority
FROM final f
LEFT JOIN long b ON b.mixture = f.mixture AND b.scale = f.scale AND b.algo = f.algo AND b.kl = f.kl
               AND b.seed = f.seed AND b.step = 0 AND b.format = f.winner
LEFT JOIN start s ON s.mixture = f.mixture AND s.scale = f.scale AND s.algo = f.algo AND s.kl = f.kl
               AND s.seed = f.seed
ORDER BY f.mixture, f.scale, f.algo, f.kl, f.seed;
