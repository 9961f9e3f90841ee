"""The typed run configuration (`Config` and its sections) and how TOML files and `--set` overrides become one.
No Ray, no torch."""

from protopo_ray.config.run import *  # noqa: F401,F403
