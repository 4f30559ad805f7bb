-- F6 algorithms: per cell at KL 0, pass@1 after RL and how far the winning format's share moved, by algorithm.
SELECT mixture, scale, algo, kl, seed, pass1_before, pass1_after, winner, winner_share_before, winner_share_after,
       winner_share_after - winner_share_before AS shift
FROM rl_outcomes WHERE kl = 0
ORDER BY mixture, scale, seed, algo;
