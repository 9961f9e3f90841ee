"""Watching a search live: metric names and tags (defined once), their emitters, the Grafana dashboard generated from
them, and a local Prometheus. Ray side: imported by cluster/ and search/ only (the Ray-free core never does)."""
