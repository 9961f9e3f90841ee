"""The report of an experiment directory: markdown tables and plots from the stage records. No Ray, no torch."""
