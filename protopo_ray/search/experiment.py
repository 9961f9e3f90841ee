"""Experiment files: a base run config plus a list of search stages, read from TOML into dataclasses.

    name = "default"
    [experiment]            # synthetic = N prepares the embedded synthetic set when data.path is missing
    [data] [model] [train] [resources]     # the base run config (see protopo_ray.config)
    [prices]                # USD per hour of the cluster's nodes (protopo_ray.search.cost; defaults for its GPU types)
    [[stages]]              # one table per stage, run in order
    name = "architecture"
    kind = "search"         # search | promotion | ensemble (protopo_ray.search.rotation)
    search = "grid"         # grid | hyperopt
    metric = "val_overlap_acc"
    [stages.grid]           # dotted run-config keys -> values to try (grid search)
    "model.gc_size" = [64, 128]
    [stages.space]          # HyperOpt distributions (search = "hyperopt")
    "train.lr" = { dist = "loguniform", low = 1e-4, high = 3e-3 }
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protopo_ray.config import Config, read_toml, set_dotted
from protopo_ray.search.cost import PriceConfig

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "quniform", "randint")


@dataclass(kw_only=True, frozen=True, slots=True)
class StageSpec:
    name: str
    """Stage name: the directory of its results and its label in the report."""
    kind: str = "search"
    """search (a grid or HyperOpt over the space, ASHA stopping), promotion (top-k continue longer) or ensemble
    (the config trained once per validation fold, the members decoded together: protopo_ray.search.rotation)."""
    search: str = "grid"
    """grid or hyperopt (search stages)."""
    metric: str = "val_overlap_acc"
    """Reported metric that ranks trials (ASHA and promotion)."""
    mode: str = "max"
    """max or min."""
    max_epochs: int = 6
    """Epoch budget of a trial (promotion: the new total, counted from epoch 0)."""
    grace_epochs: int = 1
    """ASHA: epochs before a trial may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep 1/reduction_factor of trials at each rung."""
    scheduler: str = "asha"
    """asha (Ray's asynchronous halving), sha (synchronous halving: trials pause at each rung until the whole
    cohort is there, then the best 1/reduction_factor continue; grid searches) or none."""
    num_samples: int = 1
    """grid: repeats of the grid; hyperopt: number of sampled configs."""
    inherit: str = "best"
    """best: start from the best config of the previous stage; base: from the base config."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted run-config key -> list of values (search = grid)."""
    order: str = "shuffled"
    """grid: the order trials start in, shuffled (seeded) or listed. Asynchronous ASHA judges a trial against
    the trials before it, so a grid listed from small to large models lets nearly every newcomer through:
    replayed on the benchmark grid's curves, 0.70 of the grid's epochs in listed order, 0.40 shuffled."""
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted run-config key -> {dist, low, high | values} (search = hyperopt)."""
    top_k: int = 2
    """promotion: how many of the best trials continue."""
    from_stages: tuple[str, ...] = ()
    """promotion: stages whose trials compete (default: the previous stage)."""
    folds: tuple[str, ...] = ()
    """ensemble: each member's validation fold (default: every train and val fold of the base config in turn)."""

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        checks = [
            (self.kind in ("search", "promotion", "ensemble"),
             f"kind must be search, promotion or ensemble, got {self.kind!r}"),
            (not self.folds or self.kind == "ensemble", "folds is a key of ensemble stages only"),
            (self.search in ("grid", "hyperopt"), f"search must be grid or hyperopt, got {self.search!r}"),
            (self.mode in ("max", "min"), f"mode must be max or min, got {self.mode!r}"),
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (1 <= self.grace_epochs <= self.max_epochs, f"grace_epochs must be in [1, max_epochs], got {self.grace_epochs}"),
            (self.reduction_factor >= 2, f"reduction_factor must be >= 2, got {self.reduction_factor}"),
            (self.scheduler in ("asha", "sha", "none"), f"scheduler must be asha, sha or none, got {self.scheduler!r}"),
            (self.scheduler != "sha" or self.search == "grid" or self.kind != "search",
             "scheduler = sha needs search = grid (a rung waits for every trial of the stage)"),
            (self.order in ("shuffled", "listed"), f"order must be shuffled or listed, got {self.order!r}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.inherit in ("best", "base"), f"inherit must be best or base, got {self.inherit!r}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{where}: {message}")
        if self.kind == "search" and self.search == "grid":
            if not self.grid:
                raise ValueError(f"{where}: a grid search needs a non-empty [stages.grid] table")
            for key, values in self.grid.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{where}: grid {key!r} must be a non-empty list of values, got {values!r}")
        if self.kind == "search" and self.search == "hyperopt":
            if not self.space:
                raise ValueError(f"{where}: a hyperopt search needs a non-empty [stages.space] table")
            for key, spec in self.space.items():
                dist = spec.get("dist") if isinstance(spec, dict) else None
                if dist not in DISTRIBUTIONS:
                    raise ValueError(f"{where}: space {key!r} needs dist in {DISTRIBUTIONS}, got {spec!r}")
                needed = ("values",) if dist == "choice" else ("low", "high")
                if any(k not in spec for k in needed):
                    raise ValueError(f"{where}: space {key!r} ({dist}) needs {needed}")

    @property
    def searched_keys(self) -> tuple[str, ...]:
        return tuple(self.grid) if self.search == "grid" else tuple(self.space)


@dataclass(kw_only=True, frozen=True, slots=True)
class Experiment:
    name: str
    base: Config
    stages: tuple[StageSpec, ...]
    synthetic: int = 0
    """Prepare the embedded synthetic set with this many proteins when data.path holds no shards (0 = never)."""
    seed: int = 0
    """Seed of the synthetic set and of HyperOpt."""
    wandb_project: str = "protopo_ray"
    prices: PriceConfig = field(default_factory=PriceConfig)
    """USD per hour of the cluster's nodes: what the planner prefers the cheaper pool by and the report's dollars."""
    source: str = ""

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in {self.source}; stages: {[s.name for s in self.stages]}")


_EXPERIMENT_FIELDS = {"synthetic", "seed", "wandb_project"}


def parse_experiment(values: dict[str, Any], source: str = "experiment", overrides: dict[str, Any] | None = None) -> Experiment:
    """Experiment from a parsed TOML dict; every error names the file and the key or stage."""
    values = dict(values)
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value, where="--set")
    stages_raw = values.pop("stages", None)
    meta = values.pop("experiment", {})
    prices = PriceConfig.from_dict(values.pop("prices", {}), where=f"{source}: [prices]")
    unknown_meta = sorted(set(meta) - _EXPERIMENT_FIELDS)
    if unknown_meta:
        raise ValueError(f"{source}: [experiment] unknown key(s) {unknown_meta}; known: {sorted(_EXPERIMENT_FIELDS)}")
    base = Config.from_dict(values, where=source)
    if not stages_raw:
        raise ValueError(f"{source}: no [[stages]]; an experiment needs at least one stage")
    names = [f.name for f in dataclasses.fields(StageSpec)]
    stages = []
    for i, raw in enumerate(stages_raw):
        where = f"{source}: stages[{i}]"
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"{where} ({raw.get('name', '?')}): unknown key(s) {unknown}; known: {sorted(names)}")
        if "name" not in raw:
            raise ValueError(f"{where}: every stage needs a name")
        raw = dict(raw)
        for key in ("from_stages", "folds"):
            if key in raw:
                raw[key] = tuple(raw[key])
        if raw.get("kind") == "ensemble" and not raw.get("folds"):
            from protopo_ray.search.rotation import rotation_pool

            raw["folds"] = rotation_pool(base)
        try:
            stages.append(StageSpec(**raw))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None
    _check_stages(stages, base, source)
    return Experiment(name=values.get("name", base.name), base=base, stages=tuple(stages), source=source,
                      prices=prices, **{k: meta[k] for k in meta})


def _check_stages(stages: list[StageSpec], base: Config, source: str) -> None:
    from protopo_ray.training.fit import REPORTED_METRICS

    seen: list[str] = []
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"{source}: two stages named {stage.name!r}")
        if stage.metric not in REPORTED_METRICS:
            raise ValueError(f"{source}: stage {stage.name!r} metric {stage.metric!r} is never reported by the trainer; "
                             f"choose one of: {', '.join(m for m in REPORTED_METRICS if m.startswith('val_'))}")
        if stage.kind == "promotion":
            if not seen:
                raise ValueError(f"{source}: promotion stage {stage.name!r} needs an earlier stage to promote from")
            missing = [s for s in stage.from_stages if s not in seen]
            if missing:
                raise ValueError(f"{source}: stage {stage.name!r} from_stages {missing} are not earlier stages")
        if stage.kind == "ensemble":
            from protopo_ray.search.rotation import check_folds

            check_folds(stage, base, source)
        # Every searched key must be a real run-config key with a valid value: try it on the base.
        for key in stage.searched_keys:
            sample = stage.grid[key][0] if stage.search == "grid" else _space_sample(stage.space[key])
            try:
                base.replace({key: sample})
            except ValueError as error:
                raise ValueError(f"{source}: stage {stage.name!r} searches {key!r}: {error}") from None
        seen.append(stage.name)


def _space_sample(spec: dict[str, Any]) -> Any:
    return spec["values"][0] if spec["dist"] == "choice" else spec["low"]


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    return parse_experiment(read_toml(path), source=str(path), overrides=overrides)
