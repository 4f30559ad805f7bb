-- Format shares and accuracy over RL steps, per cell and benchmark (step 0 is the pretrained model).
SELECT mixture, scale, algo, kl, seed, benchmark, step,
       share_tinygsm, share_omi1, share_text, pass1, pass_k, maj_k, k
FROM eval_curves
ORDER BY mixture, scale, algo, kl, seed, benchmark, step;
