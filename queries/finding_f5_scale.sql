-- F5 scale: per PPO cell at KL 0, the format it converged to, by mixture and scale.
SELECT mixture, scale, algo, kl, seed, winner, winner_share_after
FROM rl_outcomes WHERE algo = 'ppo' AND kl = 0
ORDER BY mixture, scale, seed;
