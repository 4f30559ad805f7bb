-- One row per pretrained model (mixture, scale, seed): when pretraining learned its skill, how right each format was before RL, and what PPO at KL 0 did with it (configs/seeds.yaml).
-- onset_step: the first step past 20% of pretraining at which the 50-step mean loss is below the midpoint of
-- its value at 20% and its final value (the loss's drop); onset_frac: onset_step / steps.
-- collapse_step: the first rollout step with one format at 90% or more of the rollouts (NULL: never).
-- skill: both code formats at least 70% right before RL and the onset before 60% of the steps;
-- phenomenon: PPO's collapse within the first episode and greedy pass@1 up by at least 10 points.
WITH primary_benchmark AS (
    SELECT json_extract_string(value, '$[0]') AS benchmark FROM meta WHERE key = 'benchmarks'
),
smooth AS (
    SELECT mixture, scale, seed, step,
           avg(loss) OVER (PARTITION BY mixture, scale, seed ORDER BY step ROWS BETWEEN 49 PRECEDING AND CURRENT ROW) AS loss50,
           max(step) OVER (PARTITION BY mixture, scale, seed) AS steps
    FROM pretrain_curves
),
ends AS (
    SELECT mixture, scale, seed, any_value(steps) AS steps,
           arg_min(loss50, abs(step - 0.2 * steps)) AS loss_early,
           arg_max(loss50, step) AS loss_final
    FROM smooth GROUP BY ALL
),
onset AS (
    SELECT mixture, scale, seed, e.steps, e.loss_final,
           min(s.step) FILTER (WHERE s.step >= 0.2 * e.steps AND s.loss50 < (e.loss_early + e.loss_final) / 2) AS onset_step
    FROM smooth s JOIN ends e USING (mixture, scale, seed) GROUP BY ALL
),
base AS (
    SELECT mixture, scale, seed, share_tinygsm, share_omi1, share_text, acc_tinygsm, acc_omi1, acc_text, pass1, mean_acc
    FROM evals WHERE algo = 'base' AND benchmark = (SELECT benchmark FROM primary_benchmark)
),
ppo AS (
    SELECT mixture, scale, seed, collapse_step, episode_end, winner, winner_share_after, pass1_after
    FROM rl_outcomes WHERE algo = 'ppo' AND kl = 0
)
SELECT o.mixture, o.scale, o.seed, o.steps, o.onset_step, round(o.onset_step / o.steps, 2) AS onset_frac,
       round(o.loss_final, 3) AS loss_final,
       round(b.share_tinygsm, 2) AS share_tinygsm, round(b.share_omi1, 2) AS share_omi1, round(b.share_text, 2) AS share_text,
       round(b.acc_tinygsm, 2) AS right_tinygsm, round(b.acc_omi1, 2) AS right_omi1, round(b.acc_text, 2) AS right_text,
       p.collapse_step, p.episode_end, p.winner, round(p.winner_share_after, 2) AS winner_share,
       round(b.pass1, 3) AS pass1_before, round(p.pass1_after, 3) AS pass1_after,
       coalesce(b.acc_tinygsm >= 0.7 AND b.acc_omi1 >= 0.7 AND o.onset_step < 0.6 * o.steps, false) AS skill,
       coalesce(p.collapse_step <= p.episode_end AND p.pass1_after - b.pass1 >= 0.1, false) AS phenomenon
FROM onset o
LEFT JOIN base b USING (mixture, scale, seed)
LEFT JOIN ppo p USING (mixture, scale, seed)
ORDER BY o.mixture, o.scale, o.seed;
