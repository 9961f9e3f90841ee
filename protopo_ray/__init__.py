"""protopo_ray: protein-topology predictors (graph conv -> biLSTM) tuned at cluster scale with Ray."""

__version__ = "0.1.0"
