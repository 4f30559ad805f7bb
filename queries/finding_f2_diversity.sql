-- F2 diversity: per PPO/GRPO cell at KL 0, pass@1 and maj@k before and after RL, and how far pass@k ends below its peak.
SELECT mixture, scale, algo, kl, seed, pass1_before, pass1_after, maj_k_before, maj_k_after,
       pass_k_peak, pass_k_after, pass_k_after - pass_k_peak AS pass_k_from_peak
FROM rl_outcomes WHERE algo IN ('ppo', 'grpo') AND kl = 0
ORDER BY mixture, scale, algo, seed;
