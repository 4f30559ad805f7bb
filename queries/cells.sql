-- Every grid cell with its status (evaluated, trained / pretrained, missing).
SELECT mixture, scale, algo, kl, seed, kind, status FROM cells ORDER BY kind, mixture, scale, algo, kl, seed;
