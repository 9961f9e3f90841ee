"""The typed run configuration (`Config` and its sections), what ranks runs (`Objective`), and how TOML files and
`--set` overrides become a config (`files`). No Ray, no torch."""

from protopo_ray.config.files import (
    EXPERIMENT_TABLES,
    ExperimentSettings,
    describe_keys,
    load_config,
    parse_overrides,
    parse_value,
    read_toml,
    save_config,
)
from protopo_ray.config.objective import Objective
from protopo_ray.config.run import (
    DECODERS,
    GC_OPERATORS,
    SCHEDULES,
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    ResourcesConfig,
    TrainConfig,
    set_dotted,
)

__all__ = ["DECODERS", "EXPERIMENT_TABLES", "GC_OPERATORS", "SCHEDULES", "SECTIONS", "Config", "DataConfig",
           "ExperimentSettings", "ModelConfig", "Objective", "ResourcesConfig", "TrainConfig", "describe_keys",
           "load_config", "parse_overrides", "parse_value", "read_toml", "save_config", "set_dotted"]
