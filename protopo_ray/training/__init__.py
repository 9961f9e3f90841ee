"""One training run in one process: splits, the loop, the LR schedule, checkpoints, evaluation and memory
bookkeeping. What a Ray worker runs too, through a session (`protopo_ray.cluster.sessions`); no Ray here."""
