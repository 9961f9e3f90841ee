"""Stage kinds: what a stage of a search is and what it does, one class per kind.

    [[stages]]
    name = "architecture"
    kind = "search"          # search (default) | promotion | ensemble

    search     a grid or a HyperOpt sample over dotted run-config keys, with ASHA, synchronous halving or no
               early stopping: many small trials, each on a share of a GPU
    promotion  the top_k trials of earlier stages continue from their checkpoints to a longer budget, as final
               runs: whole GPUs of the biggest type, DDP where GPUs outnumber trials
    ensemble   the stage's base config trained once per validation fold (fold rotation), planned as final runs,
               every member to the full budget; its members' best checkpoints decode together and are the winner

Each kind owns its keys (validated on construction; a key of another kind is named as such), its trial count,
its Tune parameter space and the run-config change a trial's parameters make, its hardware plan, its scheduler,
and what it adds to a finished stage. `protopo_ray.search.experiment` reads them from TOML.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.hyperopt import HyperOptSearch

from protopo_ray.config import Config, Objective
from protopo_ray.config.objective import MODES, finite
from protopo_ray.model.footprint import trial_footprint
from protopo_ray.search.halving import SynchronousHalving
from protopo_ray.search.inventory import Inventory
from protopo_ray.search.plan import StagePlan, plan_promotion, plan_search
from protopo_ray.search.prices import PriceConfig
from protopo_ray.search.results import Continuation, EnsembleRecord, ExperimentDir, StageRecord
from protopo_ray.training.predictor import EnsembleMember, build_ensemble

CONTINUE_KEY = "continue"  # the Tune parameter that carries a promoted trial's Continuation
ROTATION_KEY = "val_fold"  # the Tune parameter of an ensemble member: its validation fold
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "quniform", "randint")


@dataclass(frozen=True)
class TuneOptions:
    """How Tune runs a stage's trials."""

    scheduler: TrialScheduler | None
    search_alg: Searcher | None
    num_samples: int
    max_concurrent_trials: int | None
    """None: no limit from Tune (the search algorithm or the trials' resource requests bound it)."""


def _fail(stage: str, message: str) -> None:
    raise ValueError(f"stage {stage!r}: {message}")


@dataclass(kw_only=True, frozen=True, slots=True)
class Stage:
    """What every kind has."""

    kind: ClassVar[str] = ""
    name: str
    """Stage name: the directory of its results and its label in the report."""
    metric: str = "val_overlap_acc"
    """Reported metric that ranks trials (and picks each run's best epoch)."""
    mode: str = "max"
    """max or min."""
    max_epochs: int = 6
    """Epoch budget of a trial (promotion: the new total, counted from epoch 0)."""
    inherit: str = "best"
    """best: start from the best config of the previous stage; base: from the base config."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            _fail(self.name, f"mode must be max or min, got {self.mode!r}")
        if self.max_epochs < 1:
            _fail(self.name, f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.inherit not in ("best", "base"):
            _fail(self.name, f"inherit must be best or base, got {self.inherit!r}")

    @property
    def objective(self) -> Objective:
        return Objective(self.metric, self.mode)

    # -- what the stage runs -----------------------------------------------------------------------------------
    def check(self, base: Config, earlier: list[str]) -> None:
        """Checks against the base config and the stages before it (raise ValueError)."""

    def num_trials(self, promoted: list[Continuation] | None = None) -> int:
        raise NotImplementedError

    def param_space(self, promoted: list[Continuation] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def trial_values(self, params: dict[str, Any], base: Config) -> dict[str, Any]:
        """The dotted run-config changes a trial's Tune parameters make to the stage's base config."""
        return dict(params)

    def planned_configs(self, base: Config, promoted: list[Continuation] | None = None) -> list[Config]:
        """The configs the hardware plan is sized for (before any trial ran)."""
        raise NotImplementedError

    def plan(self, inventory: Inventory, base: Config, longest: int, prices: PriceConfig,
             promoted: list[Continuation] | None = None) -> StagePlan:
        raise NotImplementedError

    def tune_options(self, plan: StagePlan, seed: int, halving_file: Path) -> TuneOptions:
        """Every trial to its full budget, as many at once as the plan allows (final runs)."""
        return TuneOptions(scheduler=None, search_alg=None, num_samples=1,
                           max_concurrent_trials=plan.max_concurrent_trials or None)

    # -- how it is shown and recorded --------------------------------------------------------------------------
    @property
    def stopper(self) -> str | None:
        """The name of what stops trials early (None: every trial runs to its budget)."""
        return None

    def describe(self) -> str:
        """How the trials run, for the console's stage header."""
        raise NotImplementedError

    def record_fields(self) -> dict[str, Any]:
        """What the stage record keeps of this kind's settings."""
        return {"scheduler": "none"}

    def finish(self, record: StageRecord, exp: ExperimentDir) -> None:
        """What the finished stage adds to its record (an ensemble: the predictor its members make)."""

    def _plan_final_runs(self, inventory: Inventory, configs: list[Config], longest: int, num_trials: int,
                         prices: PriceConfig) -> StagePlan:
        # Final runs, planned alike: whole GPUs of the biggest type, DDP across several where there are more GPUs
        # than trials, a trial's workers capped by its global batch (each rank takes one protein at least).
        footprint = max(trial_footprint(c, longest).total_bytes for c in configs)
        plan = plan_promotion(inventory, footprint, num_trials=num_trials,
                              max_workers=min(c.data.batch_size for c in configs), prices=prices)
        return StagePlan.from_json({**plan.to_json(), "kind": self.kind})


@dataclass(kw_only=True, frozen=True, slots=True)
class SearchStage(Stage):
    kind: ClassVar[str] = "search"
    search: str = "grid"
    """grid or hyperopt."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted run-config key -> list of values (search = grid)."""
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted run-config key -> {dist, low, high | values} (search = hyperopt)."""
    num_samples: int = 1
    """grid: repeats of the grid; hyperopt: number of sampled configs."""
    order: str = "shuffled"
    """grid: the order trials start in, shuffled (seeded) or listed. Asynchronous ASHA judges a trial against
    the trials before it, so a grid listed from small to large models lets nearly every newcomer through:
    replayed on the benchmark grid's curves, 0.70 of the grid's epochs in listed order, 0.40 shuffled."""
    scheduler: str = "asha"
    """asha (Ray's asynchronous halving), sha (synchronous halving: trials pause at each rung until the whole
    cohort is there, then the best 1/reduction_factor continue; grid searches) or none."""
    grace_epochs: int = 1
    """Epochs before a trial may be stopped."""
    reduction_factor: int = 2
    """Keep 1/reduction_factor of trials at each rung."""

    def __post_init__(self) -> None:
        Stage.__post_init__(self)
        checks = [
            (self.search in ("grid", "hyperopt"), f"search must be grid or hyperopt, got {self.search!r}"),
            (1 <= self.grace_epochs <= self.max_epochs, f"grace_epochs must be in [1, max_epochs], got {self.grace_epochs}"),
            (self.reduction_factor >= 2, f"reduction_factor must be >= 2, got {self.reduction_factor}"),
            (self.scheduler in ("asha", "sha", "none"), f"scheduler must be asha, sha or none, got {self.scheduler!r}"),
            (self.scheduler != "sha" or self.search == "grid",
             "scheduler = sha needs search = grid (a rung waits for every trial of the stage)"),
            (self.order in ("shuffled", "listed"), f"order must be shuffled or listed, got {self.order!r}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
        ]
        for ok, message in checks:
            if not ok:
                _fail(self.name, message)
        if self.search == "grid":
            if not self.grid:
                _fail(self.name, "a grid search needs a non-empty [stages.grid] table")
            for key, values in self.grid.items():
                if not isinstance(values, list) or not values:
                    _fail(self.name, f"grid {key!r} must be a non-empty list of values, got {values!r}")
        else:
            if not self.space:
                _fail(self.name, "a hyperopt search needs a non-empty [stages.space] table")
            for key, spec in self.space.items():
                dist = spec.get("dist") if isinstance(spec, dict) else None
                if dist not in DISTRIBUTIONS:
                    _fail(self.name, f"space {key!r} needs dist in {DISTRIBUTIONS}, got {spec!r}")
                needed = ("values",) if dist == "choice" else ("low", "high")
                if any(k not in spec for k in needed):
                    _fail(self.name, f"space {key!r} ({dist}) needs {needed}")

    @property
    def searched_keys(self) -> tuple[str, ...]:
        return tuple(self.grid) if self.search == "grid" else tuple(self.space)

    def grid_points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def check(self, base: Config, earlier: list[str]) -> None:
        # Every searched key must be a real run-config key with a valid value: try one on the base.
        for key in self.searched_keys:
            spec = self.space.get(key, {})
            sample = self.grid[key][0] if self.search == "grid" else (
                spec["values"][0] if spec["dist"] == "choice" else spec["low"])
            try:
                base.replace({key: sample})
            except ValueError as error:
                raise ValueError(f"stage {self.name!r} searches {key!r}: {error}") from None

    def num_trials(self, promoted: list[Continuation] | None = None) -> int:
        if self.search == "grid":
            return math.prod(len(v) for v in self.grid.values()) * self.num_samples
        return self.num_samples

    def param_space(self, promoted: list[Continuation] | None = None) -> dict[str, Any]:
        if self.search == "grid":
            return {key: tune.grid_search(values) for key, values in self.grid.items()}
        space = {}
        for key, spec in self.space.items():
            dist = spec["dist"]
            if dist == "choice":
                space[key] = tune.choice(spec["values"])
            elif dist == "uniform":
                space[key] = tune.uniform(spec["low"], spec["high"])
            elif dist == "loguniform":
                space[key] = tune.loguniform(spec["low"], spec["high"])
            elif dist == "quniform":
                space[key] = tune.quniform(spec["low"], spec["high"], spec.get("q", 1))
            else:
                space[key] = tune.randint(spec["low"], spec["high"])
        return space

    def planned_configs(self, base: Config, promoted: list[Continuation] | None = None) -> list[Config]:
        if self.search == "grid":
            return [base.replace(point) for point in self.grid_points()]
        # HyperOpt: size the plan for the largest corner of the space.
        corner = {k: (max(s["values"]) if s["dist"] == "choice" else s["high"]) for k, s in self.space.items()}
        return [base.replace({k: v for k, v in corner.items() if not isinstance(v, str)})]

    def plan(self, inventory: Inventory, base: Config, longest: int, prices: PriceConfig,
             promoted: list[Continuation] | None = None) -> StagePlan:
        footprints = [trial_footprint(c, longest).total_bytes for c in self.planned_configs(base)]
        return plan_search(inventory, footprints, prices=prices, num_trials=self.num_trials(),
                           cpus_per_trial=base.resources.cpus_per_worker)

    def tune_options(self, plan: StagePlan, seed: int, halving_file: Path) -> TuneOptions:
        scheduler, limit = None, plan.max_concurrent_trials
        if self.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", max_t=self.max_epochs, grace_period=self.grace_epochs,
                                      reduction_factor=self.reduction_factor)
        elif self.scheduler == "sha":
            scheduler = SynchronousHalving(time_attr="epoch", objective=self.objective, grace=self.grace_epochs,
                                           reduction_factor=self.reduction_factor, max_t=self.max_epochs,
                                           num_trials=self.num_trials(), state_file=halving_file)
            # Paused trials count as live for Tune's concurrency limits, and a rung waits for its whole cohort: with
            # a limit the stage would wait forever. The trials' own resource requests bound what runs at once.
            limit = 0
        if self.search == "hyperopt":
            # HyperOpt, a Searcher, gets Tune's ConcurrencyLimiter from max_concurrent_trials.
            return TuneOptions(scheduler=scheduler, search_alg=HyperOptSearch(random_state_seed=seed),
                               num_samples=self.num_samples, max_concurrent_trials=limit or None)
        if self.order == "shuffled":
            # Every grid point (times num_samples) as a preset in seeded random order; the generator enforces its
            # own limit (Tune ignores max_concurrent_trials for generators), one sample per preset.
            points = self.grid_points() * self.num_samples
            random.Random(seed).shuffle(points)
            return TuneOptions(scheduler=scheduler,
                               search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=limit),
                               num_samples=len(points), max_concurrent_trials=None)
        return TuneOptions(scheduler=scheduler, search_alg=None, num_samples=self.num_samples,
                           max_concurrent_trials=limit or None)

    @property
    def stopper(self) -> str | None:
        return {"asha": "ASHA", "sha": "halving"}.get(self.scheduler)

    def describe(self) -> str:
        return f"{self.search} search" + (f", {self.stopper} from epoch {self.grace_epochs}" if self.stopper else "")

    def record_fields(self) -> dict[str, Any]:
        return {"search": self.search, "scheduler": self.scheduler, "grace_epochs": self.grace_epochs,
                "reduction_factor": self.reduction_factor}


@dataclass(kw_only=True, frozen=True, slots=True)
class PromotionStage(Stage):
    kind: ClassVar[str] = "promotion"
    top_k: int = 2
    """How many of the best trials continue."""
    from_stages: tuple[str, ...] = ()
    """Stages whose trials compete (default: the previous stage)."""

    def __post_init__(self) -> None:
        Stage.__post_init__(self)
        if self.top_k < 1:
            _fail(self.name, f"top_k must be >= 1, got {self.top_k}")

    def check(self, base: Config, earlier: list[str]) -> None:
        if not earlier:
            raise ValueError(f"promotion stage {self.name!r} needs an earlier stage to promote from")
        missing = [s for s in self.from_stages if s not in earlier]
        if missing:
            raise ValueError(f"stage {self.name!r} from_stages {missing} are not earlier stages")

    def candidates(self, records: dict[str, StageRecord]) -> list[Continuation]:
        """The top_k trials of the competing stages (by this stage's metric), each as the Continuation that
        extends it from its latest checkpoint; raises when none has a checkpoint and a score."""
        sources = [records[name] for name in (self.from_stages or [list(records)[-1]])]
        pool = [(record.stage, t) for record in sources for t in record.trials
                if t.checkpoint and finite(t.best.get(self.metric))]
        ranked = self.objective.ranked(pool, lambda item: item[1].best[self.metric])
        chosen = [Continuation(from_stage=name, from_trial=t.trial_id, checkpoint=t.checkpoint, start_epoch=t.epochs,
                               params=dict(t.params), overrides=_continued_overrides(t.config))
                  for name, t in ranked[: self.top_k]]
        if not chosen:
            raise RuntimeError(f"stage {self.name!r}: no trial with a checkpoint to promote from "
                               f"{[record.stage for record in sources]}")
        return chosen

    def num_trials(self, promoted: list[Continuation] | None = None) -> int:
        return len(promoted) if promoted else self.top_k

    def param_space(self, promoted: list[Continuation] | None = None) -> dict[str, Any]:
        return {CONTINUE_KEY: tune.grid_search([c.to_params() for c in promoted or []])}

    def trial_values(self, params: dict[str, Any], base: Config) -> dict[str, Any]:
        spec = Continuation.from_params(params[CONTINUE_KEY])
        return {**spec.overrides, "train.init_checkpoint": spec.checkpoint}

    def planned_configs(self, base: Config, promoted: list[Continuation] | None = None) -> list[Config]:
        return [base.replace(c.overrides) for c in promoted] if promoted else [base]

    def plan(self, inventory: Inventory, base: Config, longest: int, prices: PriceConfig,
             promoted: list[Continuation] | None = None) -> StagePlan:
        return self._plan_final_runs(inventory, self.planned_configs(base, promoted), longest,
                                     self.num_trials(promoted), prices)

    def describe(self) -> str:
        return "continued from their checkpoints"


def _continued_overrides(config: Config) -> dict[str, Any]:
    """Dotted keys for a trial's full model / train / data config (resources come from the promotion plan)."""
    values = config.to_dict()
    return {f"{section}.{key}": value for section in ("data", "model", "train")
            for key, value in values[section].items() if key not in ("epochs", "init_checkpoint")}


@dataclass(kw_only=True, frozen=True, slots=True)
class EnsembleStage(Stage):
    kind: ClassVar[str] = "ensemble"
    folds: tuple[str, ...] = ()
    """Each member's validation fold (default: every train and val fold of the base config in turn). Member k
    validates on folds[k] and trains on the rest of the base config's train + val folds; test folds never rotate
    in. Members do not compete: every one runs to the full budget."""
    rule: str = "mean"
    """How the members decode as one: mean (their mean posteriors through the grammar) or vote (each decodes;
    the topology most agree on wins). protopo_ray.model.ensemble."""

    def __post_init__(self) -> None:
        Stage.__post_init__(self)
        if self.rule not in ("mean", "vote"):
            _fail(self.name, f"rule must be mean or vote, got {self.rule!r}")

    @staticmethod
    def rotation_pool(base: Config) -> tuple[str, ...]:
        """The folds members may train or validate on: the base's train and val folds (never its test folds)."""
        return tuple(dict.fromkeys(base.data.train_folds + base.data.val_folds))

    def check(self, base: Config, earlier: list[str]) -> None:
        pool = self.rotation_pool(base)
        unknown = [f for f in self.folds if f not in pool]
        if unknown:
            raise ValueError(f"ensemble stage {self.name!r} folds {unknown} are not train or val folds of the base "
                             f"config ({list(pool)}); test folds never rotate in")
        if len(set(self.folds)) != len(self.folds):
            raise ValueError(f"ensemble stage {self.name!r} lists a fold twice: {list(self.folds)}")
        if len(pool) < 2:
            raise ValueError(f"ensemble stage {self.name!r} needs at least two train + val folds to rotate, the "
                             f"base config has {list(pool)}")

    def member_overrides(self, base: Config, val_fold: str) -> dict[str, Any]:
        """The run-config change that makes the member validating on `val_fold`."""
        return {"data.val_folds": [val_fold], "data.train_folds": [f for f in self.rotation_pool(base) if f != val_fold]}

    def num_trials(self, promoted: list[Continuation] | None = None) -> int:
        return len(self.folds)

    def param_space(self, promoted: list[Continuation] | None = None) -> dict[str, Any]:
        return {ROTATION_KEY: tune.grid_search(list(self.folds))}

    def trial_values(self, params: dict[str, Any], base: Config) -> dict[str, Any]:
        return self.member_overrides(base, params[ROTATION_KEY])

    def planned_configs(self, base: Config, promoted: list[Continuation] | None = None) -> list[Config]:
        return [base.replace(self.member_overrides(base, fold)) for fold in self.folds]

    def plan(self, inventory: Inventory, base: Config, longest: int, prices: PriceConfig,
             promoted: list[Continuation] | None = None) -> StagePlan:
        return self._plan_final_runs(inventory, self.planned_configs(base), longest, self.num_trials(), prices)

    def describe(self) -> str:
        return "one ensemble member per validation fold"

    def finish(self, record: StageRecord, exp: ExperimentDir) -> None:
        """Build the ensemble from each member's best checkpoint (raises if a member has none: the stage's
        record says why it ended)."""
        members = []
        for trial in record.trials:
            fold, checkpoint = trial.params.get(ROTATION_KEY), trial.best_checkpoint()
            if not checkpoint:
                raise RuntimeError(f"ensemble stage {record.stage!r}: member {trial.trial_id} (validation fold {fold}) "
                                   f"has no checkpoint ({trial.status}: {trial.error or 'no epoch finished'}); "
                                   f"rerun the stage with --resume")
            members.append(EnsembleMember(fold=fold, trial_id=trial.trial_id, checkpoint=checkpoint))
        choice = build_ensemble(members, exp.ensemble_dir, rule=self.rule)
        record.ensemble = EnsembleRecord(path=str(exp.ensemble_dir), members={m.fold: m.trial_id for m in members},
                                         decoding=choice.decoding, out_of_fold=choice.figures,
                                         topo_mean_by_setting=choice.topo_mean)


STAGE_KINDS: dict[str, type[Stage]] = {cls.kind: cls for cls in (SearchStage, PromotionStage, EnsembleStage)}
