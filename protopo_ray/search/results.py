"""The experiment directory and its records: one place for its layout and for reading and writing each file.

    EXP = STORAGE/NAME (a local working copy `storage.working_dir` when STORAGE is an object store; the search
    mirrors it there after every stage, and Ray writes tune/ and train/ there directly)
      experiment.json        ExperimentRecord: name, source TOML, stage names, the base config
      stages/<stage>.json    StageRecord, one per finished stage: its plan, every trial (TrialRecord), its ensemble
      tune/<stage>/          Ray Tune's own state (what --resume restores)
      train/<stage>_<trial>/ each trial's run: metrics.jsonl, workers.json, best/, Ray's checkpoints
      halving/<stage>.json   synchronous halving's rung decisions (protopo_ray.search.halving)
      budget/<stage>.stop    written when the [budget] ran out during the stage: trials starting after it train nothing
      ensemble/              an ensemble stage's predictor: ensemble.json + members/<fold>/
      winner/                winner.json (WinnerRecord) + checkpoint/ (the winning checkpoint or ensemble)
      report.md, plots/      protopo_ray.reporting
      wandb/, logs/ray.log   W&B's offline runs; what Ray, W&B and the libraries printed

The search writes it (protopo_ray.search.run), the console and the report read it, all through `ExperimentDir`
and the record classes here; docs/results.md describes every field. Pure module: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protopo_ray.config import Config, Objective, ResourcesConfig
from protopo_ray.config.objective import finite
from protopo_ray.data import storage
from protopo_ray.model.grammar import Decoding
from protopo_ray.search.budget import BudgetConfig
from protopo_ray.search.plan import StagePlan
from protopo_ray.training.layout import best_or_latest


class ExperimentError(ValueError):
    """The directory is not a (readable) experiment directory, or a record in it is malformed."""


def _fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class Cost:
    accelerator_hours: float
    """Device-hours held while training: GPU share (or CPUs) x workers x the epochs' time."""
    usd: float
    """accelerator_hours x the stage plan's price per device-hour; NaN when the price is unknown."""
    saved_accelerator_hours: float
    """Epochs the scheduler did not run x the trial's own measured device-hours per epoch."""
    saved_usd: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(Cost)))


NO_COST = Cost(0.0, 0.0, 0.0, 0.0)


def usd_text(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"${value:.2f}" if abs(value) >= 1 else f"${value:.4f}"


def held_devices(resources: ResourcesConfig) -> float:
    """Devices a trial holds, what its hours are priced by (the plan's price is per GPU, or per vCPU on CPU
    plans): its GPU share, else its CPUs, times its workers. One rule for the records and the live budget."""
    per_worker = resources.gpus_per_worker if resources.gpus_per_worker else resources.cpus_per_worker
    return max(1, resources.num_workers) * per_worker


@dataclass(kw_only=True)
class BudgetStop:
    """A stage that stopped starting trials because the search's `[budget]` would be exceeded
    (protopo_ray.search.guard): where the spend and the wall time stood then."""

    limit: str
    """usd or wall: the limit the next epoch would have exceeded."""
    usd: float
    """Dollars the search had spent (every stage's trials, measured device-hours x price) when it stopped."""
    max_usd: float | None
    wall_s: float
    """Seconds the search's stages had run when it stopped."""
    max_wall_s: float | None
    stopped_trials: list[str] = field(default_factory=list)
    """Trials stopped at the end of the epoch they were in."""
    unstarted_trials: int = 0
    """Trials of the stage that never ran an epoch (a grid's remaining points, samples not drawn)."""

    def text(self) -> str:
        """'stopped starting trials at $0.41 of $0.50 (wall 0.2 h of 1 h)': what the console and report say."""
        usd = f"at {usd_text(self.usd)}" + (f" of {usd_text(self.max_usd)}" if self.max_usd is not None else "")
        wall = f"{self.wall_s / 3600:.2f} h" + (f" of {self.max_wall_s / 3600:g} h" if self.max_wall_s else "")
        return f"stopped starting trials {usd} (wall {wall}; the {self.limit} limit would be exceeded)"

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> BudgetStop | None:
        return cls(**_fields(cls, values)) if values else None


@dataclass(frozen=True, kw_only=True)
class Continuation:
    """A promoted trial: the trial it extends, and where that trial's training stopped (a Tune parameter)."""

    from_stage: str
    from_trial: str
    checkpoint: str
    """The trial's checkpoint to continue from, as a path or a URI with its scheme (s3://, gs://)."""
    start_epoch: int
    params: dict[str, Any]
    """The values that trial searched (shown in the report)."""
    overrides: dict[str, Any]
    """Its full data / model / train config as dotted overrides (resources come from the promotion plan)."""

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: dict[str, Any]) -> Continuation:
        return cls(**values)


@dataclass(kw_only=True)
class TrialRecord:
    """One trial: what it ran, how far it got, its metrics and its latest checkpoint."""

    trial_id: str
    params: dict[str, Any]
    """Searched values by dotted config key (a promoted trial: those of the trial it extends)."""
    config: Config
    status: str
    """completed, stopped (early, by the scheduler), budget (stopped at the end of an epoch: the search's budget
    ran out) or error."""
    error: str | None = None
    epochs: int = 0
    start_epoch: int = 0
    resumed_from: str | None = None
    """A promoted trial's starting checkpoint."""
    promoted_from: str | None = None
    """A promoted trial's origin: the trial id it extends."""
    best: dict[str, float] = field(default_factory=dict)
    """Metrics of its best epoch by the stage metric."""
    last: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    """Latest checkpoint: a local path or a URI with its scheme."""
    accelerator_hours: float = 0.0
    running_unix: list[float] | None = None
    """When Tune ran it: [start, end] (1 s resolution)."""

    @property
    def run_uri(self) -> str:
        """The trial's run directory (metrics.jsonl, workers.json, best/)."""
        return storage.join(self.config.resources.storage, self.config.name)

    def best_checkpoint(self) -> str | None:
        """Its best epoch's checkpoint (best/ by the stage metric), else its latest one."""
        return best_or_latest(self.run_uri, self.checkpoint)

    def cost(self, plan: StagePlan | None, max_epochs: int) -> Cost:
        """What it held, in device-hours and dollars at `plan`'s price; what stopping it early saved."""
        hours = self.accelerator_hours
        price = plan.usd_per_device_hour if plan is not None and plan.usd_per_device_hour is not None else math.nan
        ran = self.epochs - self.start_epoch
        saved = max(0, max_epochs - self.epochs) * hours / ran if self.status == "stopped" and ran > 0 else 0.0
        return Cost(hours, hours * price, saved, saved * price)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "config": self.config.to_dict()}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str = "trial") -> TrialRecord:
        values = dict(values)
        params = dict(values.get("params") or {})
        if "promoted_from" in params:  # records written before promoted_from had its own field
            values.setdefault("promoted_from", params.pop("promoted_from"))
        try:
            config = Config.from_dict(values.get("config") or {}, where=f"{where} config")
            return cls(**{**_fields(cls, values), "params": params, "config": config})
        except (TypeError, ValueError) as error:
            raise ExperimentError(f"{where}: {error}") from None


@dataclass(kw_only=True)
class EnsembleRecord:
    """What an ensemble stage made: where the predictor is and how it was chosen (protopo_ray.training.predictor)."""

    path: str
    """EXP/ensemble: ensemble.json and members/<val fold>/ (each member's best checkpoint)."""
    members: dict[str, str] = field(default_factory=dict)
    """validation fold -> the trial id whose best checkpoint is that member."""
    decoding: Decoding = field(default_factory=Decoding)
    """How it decodes: entry penalty, duration weight, beta offset (chosen out of fold), rule."""
    out_of_fold: dict[str, float] = field(default_factory=dict)
    """Figures of the pooled out-of-fold predictions decoded with the chosen settings."""
    topo_mean_by_setting: dict[str, float] = field(default_factory=dict)
    """Out-of-fold topo_mean of every setting tried."""

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "decoding": self.decoding.to_json()}

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> EnsembleRecord | None:
        if not values:
            return None
        # Records written before the decoding had more than one number held its entry penalty alone.
        decoding = values.get("decoding") or {"entry_penalty": values.get("entry_penalty", 0.0), "duration_weight": 0.0}
        return cls(**{**_fields(cls, values), "decoding": Decoding.from_json(decoding)})


@dataclass(kw_only=True)
class StageRecord:
    """One finished stage (`stages/<name>.json`)."""

    stage: str
    kind: str
    """search, promotion or ensemble (protopo_ray.search.stages)."""
    metric: str
    mode: str
    max_epochs: int
    search: str = "grid"
    scheduler: str = "none"
    grace_epochs: int = 0
    reduction_factor: int = 0
    plan: StagePlan | None = None
    wall_time_s: float = 0.0
    epochs_run: int = 0
    epochs_full: int = 0
    best_trial: str | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    finished_at: str = ""
    ensemble: EnsembleRecord | None = None
    """ensemble stages: the predictor its members make."""
    budget_stop: BudgetStop | None = None
    """Set when the search's [budget] stopped the stage starting trials (its trials are those that ran)."""

    @property
    def objective(self) -> Objective:
        return Objective(self.metric, self.mode)

    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial), None)

    def ranked(self) -> list[TrialRecord]:
        """Trials best first by their best epoch's stage metric; trials without a value last."""
        return self.objective.ranked(self.trials, lambda t: t.best.get(self.metric))

    def cost(self) -> Cost:
        return sum((t.cost(self.plan, self.max_epochs) for t in self.trials), NO_COST)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "plan": self.plan.to_json() if self.plan else None,
                "trials": [t.to_json() for t in self.trials],
                "ensemble": self.ensemble.to_json() if self.ensemble else None}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str = "stage") -> StageRecord:
        if not isinstance(values, dict):
            raise ExperimentError(f"{where}: expected a JSON object, got {type(values).__name__}")
        missing = [k for k in ("stage", "kind", "metric", "mode", "max_epochs") if k not in values]
        if missing:
            raise ExperimentError(f"{where}: missing {', '.join(missing)}; not a stage record")
        trials = [TrialRecord.from_json(t, f"{where} trials[{i}]") for i, t in enumerate(values.get("trials") or [])]
        plan = StagePlan.from_json(values["plan"]) if values.get("plan") else None
        return cls(**{**_fields(cls, values), "trials": trials, "plan": plan,
                      "ensemble": EnsembleRecord.from_json(values.get("ensemble")),
                      "budget_stop": BudgetStop.from_json(values.get("budget_stop"))})


@dataclass(kw_only=True)
class WinnerRecord:
    """The search's result (`winner/winner.json`): where its predictor is and how it scored."""

    stage: str
    trial_id: str
    """The winning trial, or "ensemble" when an ensemble stage's members decode together."""
    params: dict[str, Any]
    config: Config
    val: dict[str, float]
    """Validation figures it was chosen on (an ensemble: out of fold)."""
    test: dict[str, float]
    """Its one evaluation on the held-out test folds (empty without test folds)."""
    checkpoint: str
    """EXP/winner/checkpoint: a checkpoint directory or an ensemble directory (`predict --checkpoint`)."""
    source: str
    """Where it was copied from."""
    promoted_from: str | None = None
    ensemble: EnsembleRecord | None = None
    decoding: Decoding | None = None
    """A single decoder = viterbi checkpoint: the decoding chosen on its validation folds after the search
    (`training.predictor.choose_checkpoint_decoding`), written into the winner checkpoint's config."""

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "config": self.config.to_dict(),
                "ensemble": self.ensemble.to_json() if self.ensemble else None,
                "decoding": self.decoding.to_json() if self.decoding else None}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str = "winner") -> WinnerRecord:
        try:
            decoding = values.get("decoding")
            return cls(**{**_fields(cls, values), "config": Config.from_dict(values["config"], where=f"{where} config"),
                          "ensemble": EnsembleRecord.from_json(values.get("ensemble")),
                          "decoding": Decoding.from_json(decoding) if decoding else None})
        except (KeyError, TypeError, ValueError) as error:
            raise ExperimentError(f"{where}: malformed winner record ({type(error).__name__}: {error})") from None


@dataclass(kw_only=True)
class ExperimentRecord:
    """`experiment.json`: what was searched."""

    name: str
    source: str
    """The experiment TOML it was read from."""
    stages: list[str]
    """Stage names in run order."""
    base: Config
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """The experiment's [budget] (protopo_ray.search.budget)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Stages the budget left unstarted -> why."""

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "base": self.base.to_dict(), "budget": self.budget.to_json()}

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str = "experiment") -> ExperimentRecord:
        try:
            return cls(name=values["name"], source=values.get("source", ""), stages=list(values.get("stages", [])),
                       base=Config.from_dict(values.get("base") or {}, where=f"{where} base"),
                       budget=BudgetConfig.from_json(values.get("budget")), skipped=dict(values.get("skipped") or {}))
        except (KeyError, TypeError, ValueError) as error:
            raise ExperimentError(f"{where}: malformed experiment record ({type(error).__name__}: {error})") from None


def _json_value(value: Any) -> Any:
    """What json cannot write itself (numpy scalars, paths): as text."""
    return str(value)


@dataclass(frozen=True)
class ExperimentDir:
    """The local experiment directory: every path in it, and loading and saving its records."""

    root: Path

    experiment_file = property(lambda self: self.root / "experiment.json")
    stages_dir = property(lambda self: self.root / "stages")
    ensemble_dir = property(lambda self: self.root / "ensemble")
    winner_dir = property(lambda self: self.root / "winner")
    winner_file = property(lambda self: self.root / "winner" / "winner.json")
    winner_checkpoint = property(lambda self: self.root / "winner" / "checkpoint")
    report_file = property(lambda self: self.root / "report.md")
    plots_dir = property(lambda self: self.root / "plots")
    log_file = property(lambda self: self.root / "logs" / "ray.log")
    wandb_dir = property(lambda self: self.root / "wandb")

    def stage_file(self, name: str) -> Path:
        return self.stages_dir / f"{name}.json"

    def halving_file(self, name: str) -> Path:
        return self.root / "halving" / f"{name}.json"

    @staticmethod
    def tune_uri(exp_uri: str, stage: str) -> str:
        """Ray Tune's state of a stage, where Ray writes it (local or object storage)."""
        return storage.join(exp_uri, "tune", stage)

    @staticmethod
    def budget_marker_uri(exp_uri: str, stage: str) -> str:
        """The stage's stop marker (protopo_ray.search.guard): where every node's trials read it."""
        return storage.join(exp_uri, "budget", f"{stage}.stop")

    @staticmethod
    def train_uri(exp_uri: str) -> str:
        """Where the trials' Ray Train runs and checkpoints go."""
        return storage.join(exp_uri, "train")

    # -- reading and writing ----------------------------------------------------------------------------------
    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExperimentError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e

    def _write(self, path: Path, values: dict[str, Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(values, indent=1, default=_json_value))
        tmp.replace(path)
        return path

    def save_experiment(self, record: ExperimentRecord) -> Path:
        return self._write(self.experiment_file, record.to_json())

    def load_experiment(self) -> ExperimentRecord | None:
        path = self.experiment_file
        return ExperimentRecord.from_json(self._read(path), str(path)) if path.exists() else None

    def save_stage(self, record: StageRecord) -> Path:
        return self._write(self.stage_file(record.stage), record.to_json())

    def load_stage(self, name: str) -> StageRecord:
        path = self.stage_file(name)
        return StageRecord.from_json(self._read(path), str(path))

    def load_stages(self) -> list[StageRecord]:
        """Every finished stage, in the experiment's order (stages it does not list after them, by name)."""
        files = sorted(self.stages_dir.glob("*.json")) if self.stages_dir.is_dir() else []
        by_name = {}
        for path in files:
            record = StageRecord.from_json(self._read(path), str(path))
            by_name[record.stage] = record
        experiment = self.load_experiment()
        order = [s for s in (experiment.stages if experiment else []) if s in by_name]
        return [by_name[s] for s in order + sorted(set(by_name) - set(order))]

    def save_winner(self, record: WinnerRecord) -> Path:
        return self._write(self.winner_file, record.to_json())

    def load_winner(self) -> WinnerRecord | None:
        path = self.winner_file
        return WinnerRecord.from_json(self._read(path), str(path)) if path.exists() else None


def finite_metrics(row: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite numbers of a reported row, as floats (Tune adds bookkeeping columns: `skip` their prefixes)."""
    return {k: float(v) for k, v in row.items() if finite(v) and not k.startswith(skip)}
