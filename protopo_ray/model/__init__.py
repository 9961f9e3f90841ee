"""The predictor: the GC + LSTM network, sequence features, the topology grammar and its CRF, the ensemble rule,
the metrics it is scored with, and its memory footprint. torch + PyG; no Ray."""
