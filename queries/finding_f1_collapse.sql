-- F1 collapse: per PPO/GRPO cell at KL 0, when one format first held 90% of the rollouts, the first episode's end, and the largest pass@1 gain between checkpoints.
SELECT mixture, scale, algo, kl, seed, collapse_step, episode_end, gain_step, gain, winner, winner_share_after
FROM rl_outcomes WHERE algo IN ('ppo', 'grpo') AND kl = 0
ORDER BY mixture, scale, algo, seed;
