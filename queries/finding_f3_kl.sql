-- F3 KL: per PPO/GRPO cell, the share left to the minority formats after RL and the change in pass@k, by KL coefficient.
SELECT mixture, scale, algo, kl, seed, 1 - winner_share_after AS minority_after,
       pass_k_after - pass_k_before AS pass_k_change
FROM rl_outcomes WHERE algo IN ('ppo', 'grpo')
ORDER BY mixture, scale, algo, kl, seed;
