"""The search, driven from one process with Ray Tune: experiment files, stage kinds, the cluster inventory and
hardware plan, prices, trials, schedulers, the experiment directory's records and the console."""
