"""The metrics a search exports through `ray.util.metrics`, defined once: names, tags, what each means, and the
emitters that set them where the numbers are made.

- per trial (tags experiment, stage, trial, member), set by rank 0 of the run at every epoch's report
  (`cluster.sessions.StorageSession.record`: in-process Tune trials and Ray Train runs alike): epoch, train and
  validation loss, the stage's metric, topology accuracy per protein type, residues/s, data-wait share, peak memory;
  and by the search's driver (`StageMonitor`): device-hours and dollars so far;
- per stage (tags experiment, stage), set by the driver's Tune callback: trials running / finished / stopped early /
  errored, and the search's spend against its budget.

Ray exports each on its node's metrics port with a `ray_` prefix (`MetricSpec.exported`); Prometheus scrapes them
there, the Grafana dashboard (`monitoring.grafana`) queries those names. Gauges only: every value is "where it
stands now"; Prometheus keeps the history (a validation curve is the gauge over time).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

TRIAL_TAGS = ("experiment", "stage", "trial", "member")
STAGE_TAGS = ("experiment", "stage")
NO_MEMBER = "-"
"""The member tag of a trial that is not an ensemble member."""
#: Protein types as metric keys (model.metrics.TYPE_KEYS values): the `type` tag of topology accuracy.
TYPE_KEYS = ("tm", "sptm", "sp", "glob", "beta")
TRIAL_STATES = ("running", "finished", "stopped", "errored")
"""The `state` tag of the per-stage trial counts: stopped = ended early by the scheduler or the budget."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    """Name given to `ray.util.metrics` (Ray exports it as `ray_<name>`)."""
    description: str
    tags: tuple[str, ...]
    unit: str = "none"
    """Grafana's unit for panels of it."""

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes."""
        return f"ray_{self.name}"


EPOCH = MetricSpec("protopo_trial_epoch", "Epochs the trial has finished", TRIAL_TAGS)
TRAIN_LOSS = MetricSpec("protopo_trial_train_loss", "Mean training loss of the trial's last epoch", TRIAL_TAGS)
VAL_LOSS = MetricSpec("protopo_trial_val_loss", "Validation loss after the trial's last epoch", TRIAL_TAGS)
STAGE_METRIC = MetricSpec("protopo_trial_stage_metric", "The stage's ranking metric after the trial's last epoch",
                          (*TRIAL_TAGS, "metric"))
TOPOLOGY_ACCURACY = MetricSpec("protopo_trial_topology_accuracy", "Validation topology accuracy per protein type",
                               (*TRIAL_TAGS, "type"), unit="percentunit")
RESIDUES_PER_S = MetricSpec("protopo_trial_residues_per_second", "Training residues per second (rank 0)",
                            TRIAL_TAGS)
DATA_WAIT_SHARE = MetricSpec("protopo_trial_data_wait_share", "Share of the epoch's step time spent waiting for data",
                             TRIAL_TAGS, unit="percentunit")
PEAK_MEMORY = MetricSpec("protopo_trial_peak_memory_bytes", "Peak memory of the trial's ranks: rss (host, largest "
                         "rank) or cuda (device, rank 0)", (*TRIAL_TAGS, "memory"), unit="bytes")
DEVICE_HOURS = MetricSpec("protopo_trial_device_hours", "Device-hours the trial has held (GPU share, else CPUs, times "
                          "workers, over its epochs)", TRIAL_TAGS)
TRIAL_USD = MetricSpec("protopo_trial_usd", "Dollars the trial has cost at its pool's price", TRIAL_TAGS,
                       unit="currencyUSD")
STAGE_TRIALS = MetricSpec("protopo_stage_trials", "Trials of the stage by state", (*STAGE_TAGS, "state"))
SPENT_USD = MetricSpec("protopo_search_spent_usd", "Dollars the search has spent so far (earlier stages included)",
                       STAGE_TAGS, unit="currencyUSD")
BUDGET_USD = MetricSpec("protopo_search_budget_usd", "The search's [budget] max_usd (absent: no dollar limit)",
                        STAGE_TAGS, unit="currencyUSD")

#: Every metric the code emits (the Grafana dashboard may query nothing else).
METRICS = (EPOCH, TRAIN_LOSS, VAL_LOSS, STAGE_METRIC, TOPOLOGY_ACCURACY, RESIDUES_PER_S, DATA_WAIT_SHARE, PEAK_MEMORY,
           DEVICE_HOURS, TRIAL_USD, STAGE_TRIALS, SPENT_USD, BUDGET_USD)


@dataclass(frozen=True, slots=True)
class TrialLabels:
    """Which trial a value belongs to: the tags every per-trial metric carries."""

    experiment: str
    stage: str
    trial: str
    member: str = NO_MEMBER
    """An ensemble member's validation fold ("fold 2"), else "-"."""

    def tags(self) -> dict[str, str]:
        return {"experiment": self.experiment, "stage": self.stage, "trial": self.trial, "member": self.member}

    def to_json(self) -> dict[str, str]:
        return self.tags()

    @classmethod
    def from_json(cls, data: dict[str, str]) -> TrialLabels:
        return cls(**data)


@functools.cache
def gauge(spec: MetricSpec):
    """The process's one Ray Gauge of `spec` (Ray registers a metric once per process)."""
    from ray.util.metrics import Gauge  # deferred: the Grafana generator and the tests read the specs without Ray

    return Gauge(spec.name, description=spec.description, tag_keys=spec.tags)


def set_gauge(spec: MetricSpec, value: Any, tags: dict[str, str]) -> None:
    """Set `spec` for `tags` where `value` is a finite number (NaN, None: the series keeps its last value)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        gauge(spec).set(float(value), tags=tags)


def emit_epoch(labels: TrialLabels, metrics: dict[str, float], *, metric: str, cuda_peak_bytes: int | None = None) -> None:
    """One epoch's report of a trial (rank 0; the validation figures are all-reduced already), `metric` the stage's."""
    tags = labels.tags()
    set_gauge(EPOCH, metrics.get("epoch"), tags)
    set_gauge(TRAIN_LOSS, metrics.get("train_loss"), tags)
    set_gauge(VAL_LOSS, metrics.get("val_loss"), tags)
    set_gauge(STAGE_METRIC, metrics.get(metric), {**tags, "metric": metric})
    for key in TYPE_KEYS:
        set_gauge(TOPOLOGY_ACCURACY, metrics.get(f"val_topo_{key}"), {**tags, "type": key})
    set_gauge(RESIDUES_PER_S, metrics.get("train_residues_per_s"), tags)
    set_gauge(DATA_WAIT_SHARE, metrics.get("train_data_wait_share"), tags)
    set_gauge(PEAK_MEMORY, metrics.get("peak_rss_bytes_max_rank"), {**tags, "memory": "rss"})
    if cuda_peak_bytes is not None:
        set_gauge(PEAK_MEMORY, cuda_peak_bytes, {**tags, "memory": "cuda"})


def emit_trial_cost(labels: TrialLabels, *, device_hours: float, usd: float | None) -> None:
    tags = labels.tags()
    set_gauge(DEVICE_HOURS, device_hours, tags)
    set_gauge(TRIAL_USD, usd, tags)


def emit_stage(experiment: str, stage: str, counts: dict[str, int], *, spent_usd: float,
               max_usd: float | None) -> None:
    tags = {"experiment": experiment, "stage": stage}
    for state in TRIAL_STATES:
        set_gauge(STAGE_TRIALS, counts.get(state, 0), {**tags, "state": state})
    set_gauge(SPENT_USD, spent_usd, tags)
    set_gauge(BUDGET_USD, max_usd, tags)
