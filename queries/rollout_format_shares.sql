-- Format shares of the RL training rollouts at every logged step, per cell (with the rollout reward).
SELECT mixture, scale, algo, kl, seed, step, episode, reward,
       share_tinygsm, share_omi1, share_text, acc_tinygsm, acc_omi1, acc_text
FROM rl_steps
ORDER BY mixture, scale, algo, kl, seed, step;
