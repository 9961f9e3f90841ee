"""A trained predictor on new proteins: graphs, batched predictions and label probabilities, and the files a
user reads (3-line, GFF3, TSV, plots). No Ray."""
