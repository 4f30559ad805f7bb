-- F4 winner: per RL cell, the winning format, the majority before RL, their accuracies before RL and the pass@1 change.
SELECT mixture, scale, algo, kl, seed, winner, majority_before, winner_share_before, winner_acc_before,
       majority_acc_before, pass1_after - pass1_before AS pass1_change
FROM rl_outcomes
ORDER BY mixture, scale, algo, kl, seed;
