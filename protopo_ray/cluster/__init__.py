"""The Ray side of a run: connecting to a cluster, Ray Train runs, the sessions a run uses inside Ray workers and
Tune trials, Ray Data datasets, preparation tasks and log routing. Code here runs on the cluster."""
