"""Experiment files: a base run config plus a list of search stages, read from TOML into typed stages.

    name = "default"
    [experiment]            # synthetic = N prepares the embedded synthetic set when data.path is missing
    [data] [model] [train] [resources]     # the base run config (see protopo_ray.config)
    [prices]                # USD per hour of the cluster's nodes (protopo_ray.search.prices)
    [budget]                # wall hours and dollars the search may spend (protopo_ray.search.budget)
    [[stages]]              # one table per stage, run in order
    name = "architecture"
    kind = "search"         # search | promotion | ensemble (protopo_ray.search.stages)
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

from protopo_ray.config import Config, ExperimentSettings, read_toml, set_dotted
from protopo_ray.search.budget import BudgetConfig
from protopo_ray.search.prices import PriceConfig
from protopo_ray.search.stages import STAGE_KINDS, EnsembleStage, Stage
from protopo_ray.training.fit import REPORTED_METRICS


@dataclass(kw_only=True, frozen=True, slots=True)
class Experiment:
    name: str
    base: Config
    stages: tuple[Stage, ...]
    settings: ExperimentSettings = field(default_factory=ExperimentSettings)
    prices: PriceConfig = field(default_factory=PriceConfig)
    """USD per hour of the cluster's nodes: what the planner prefers the cheaper pool by and the report's dollars."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Wall time and dollars the search may spend: it starts no trial that would exceed them."""
    source: str = ""

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in {self.source}; stages: {[s.name for s in self.stages]}")


def _stage_keys(kind: type[Stage]) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)} | {"kind"}


def parse_stage(raw: dict[str, Any], base: Config, where: str) -> Stage:
    """One `[[stages]]` table as its kind's class; every error names `where`, the stage and the key."""
    kind_name = raw.get("kind", "search")
    kind = STAGE_KINDS.get(kind_name)
    label = f"{where} ({raw.get('name', '?')})"
    if kind is None:
        raise ValueError(f"{label}: kind must be one of {', '.join(STAGE_KINDS)}, got {kind_name!r}")
    known = _stage_keys(kind)
    for key in sorted(set(raw) - known):
        owners = [name for name, other in STAGE_KINDS.items() if key in _stage_keys(other)]
        hint = f"a key of {' and '.join(owners)} stages" if owners else f"known: {sorted(known)}"
        raise ValueError(f"{label}: unknown key {key!r} for a {kind_name} stage ({hint})")
    if "name" not in raw:
        raise ValueError(f"{where}: every stage needs a name")
    values = {k: tuple(v) if k in ("from_stages", "folds") else v for k, v in raw.items() if k != "kind"}
    if kind is EnsembleStage and not values.get("folds"):
        values["folds"] = EnsembleStage.rotation_pool(base)
    try:
        return kind(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def parse_experiment(values: dict[str, Any], source: str = "experiment", overrides: dict[str, Any] | None = None) -> Experiment:
    """Experiment from a parsed TOML dict; every error names the file and the key or stage."""
    values = dict(values)
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value, where="--set")
    stages_raw = values.pop("stages", None)
    settings = ExperimentSettings.from_table(values.pop("experiment", {}), source)
    prices = PriceConfig.from_dict(values.pop("prices", {}), where=f"{source}: [prices]")
    budget = BudgetConfig.from_dict(values.pop("budget", {}), where=f"{source}: [budget]")
    base = Config.from_dict(values, where=source)
    if not stages_raw:
        raise ValueError(f"{source}: no [[stages]]; an experiment needs at least one stage")
    stages = [parse_stage(raw, base, f"{source}: stages[{i}]") for i, raw in enumerate(stages_raw)]
    earlier: list[str] = []
    for stage in stages:
        if stage.name in earlier:
            raise ValueError(f"{source}: two stages named {stage.name!r}")
        if stage.metric not in REPORTED_METRICS:
            raise ValueError(f"{source}: stage {stage.name!r} metric {stage.metric!r} is never reported by the trainer; "
                             f"choose one of: {', '.join(m for m in REPORTED_METRICS if m.startswith('val_'))}")
        try:
            stage.check(base, earlier)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        earlier.append(stage.name)
    return Experiment(name=values.get("name", base.name), base=base, stages=tuple(stages), settings=settings,
                      prices=prices, budget=budget, source=source)


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    return parse_experiment(read_toml(path), source=str(path), overrides=overrides)
