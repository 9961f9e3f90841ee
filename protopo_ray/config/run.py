"""Typed run configuration: data / model / train / resources (`protopo_ray.config.files` reads it from TOML).

Every section is a frozen dataclass whose `__post_init__` rejects nonsense, so a bad experiment fails before
any worker starts. Ray Tune hands plain dicts around; `Config.from_dict` / `Config.to_dict` are the one
place where they are converted.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from protopo_ray.config.objective import MODES, Objective
from protopo_ray.data import storage
from protopo_ray.data.alphabet import LABELS, PROTEIN_TYPES

GC_OPERATORS = ("gcn", "graphconv", "cfconv")
DECODERS = ("argmax", "viterbi", "crf")
SCHEDULES = ("constant", "linear", "cosine")
LSTM_IMPLS = ("auto", "padded", "packed")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(kw_only=True, frozen=True, slots=True)
class DataConfig:
    path: str = "data/synthetic"
    """Shard directory written by `protopo_ray.prepare` (local path, or s3:// / gs://)."""
    train_folds: tuple[str, ...] = ("train",)
    """Folds (the `fold` column of the shards) used for training."""
    val_folds: tuple[str, ...] = ("val",)
    """Folds used for validation every epoch."""
    test_folds: tuple[str, ...] = ("test",)
    """Held-out folds, evaluated once at the end of a search."""
    batch_size: int = 32
    """Proteins per batch: the global batch, split across DDP workers (each takes its 1/N of every batch)."""
    max_residues_per_batch: int = 0
    """Optional residue budget (proteins x padded length) per worker's slice of a batch: a batch closes early
    when a slice would exceed it (0 = no budget). Bounds the trial's GPU memory (`footprint`)."""
    bucket_batches: int = 16
    """Length bucketing: proteins are sorted by length inside windows of this many batches (1 = random)."""
    type_weights: dict[str, float] = field(default_factory=dict)
    """Per-type resampling weights for training, e.g. {"TM" = 2.0}; missing types weigh 1."""
    balance: str = "none"
    """none, or type: every protein type an equal share of every training batch (DeepTMHMM's sampler; rare types
    repeat within an epoch, common ones are seen in part). Replaces type_weights."""
    max_proteins: int = 0
    """Use only the first N proteins of each split (0 = all); for quick runs and tests."""
    loading: str = "auto"
    """memory (hold each split as one table: the exact global batch plan), stream (Ray Data / row-group streams,
    bounded memory at any data size), or auto: stream when the train split is estimated above stream_above_gib."""
    stream_above_gib: float = 2.0
    """With loading = auto: the in-memory size of the train split above which runs stream it."""
    shuffle_rows: int = 0
    """Streaming: rows held in the shuffle pool each window is drawn from (0 = two windows' worth)."""
    structure_dropout: float = 0.0
    """Share of the training proteins with structure graphs seen through their sequence-window graph instead, drawn
    anew each epoch (training/structure_dropout): one model then serves proteins with and without structures
    (a FASTA gets sequence graphs). Validation is then also measured on sequence graphs (val_seq_*)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path must name a shard directory")
        _check(bool(self.train_folds), "data.train_folds must list at least one fold")
        _check(bool(self.val_folds), "data.val_folds must list at least one fold")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.max_residues_per_batch >= 0, "data.max_residues_per_batch must be >= 0 (0 = no budget)")
        _check(self.bucket_batches >= 1, f"data.bucket_batches must be >= 1, got {self.bucket_batches}")
        _check(self.max_proteins >= 0, "data.max_proteins must be >= 0 (0 = all)")
        _check(self.loading in ("auto", "memory", "stream"),
               f"data.loading must be auto, memory or stream, got {self.loading!r}")
        _check(not (self.loading == "stream" and self.max_proteins),
               "data.max_proteins (the first N proteins by id) needs the in-memory path; set data.loading = "
               "'memory' or 'auto', or leave max_proteins at 0")
        _check(self.stream_above_gib >= 0, "data.stream_above_gib must be >= 0")
        _check(self.shuffle_rows >= 0, "data.shuffle_rows must be >= 0 (0 = two windows)")
        _check(self.balance in ("none", "type"), f"data.balance must be none or type, got {self.balance!r}")
        _check(0.0 <= self.structure_dropout <= 1.0,
               f"data.structure_dropout must be a share in [0, 1], got {self.structure_dropout}")
        _check(not (self.balance == "type" and self.type_weights),
               "data.balance = 'type' draws every type equally; remove data.type_weights or set balance = 'none'")
        for name, weight in self.type_weights.items():
            _check(name in PROTEIN_TYPES, f"data.type_weights: unknown type {name!r}; known: {PROTEIN_TYPES}")
            _check(weight > 0, f"data.type_weights[{name!r}] must be > 0, got {weight}")


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelConfig:
    gc_size: int = 64
    """Width of the graph-convolution encoder (the seed's GCSize)."""
    gc_layers: int = 2
    """Number of graph-convolution layers."""
    gc_operator: str = "gcn"
    """gcn (GCNConv), graphconv (GraphConv) or cfconv (distance-aware continuous filter on edge attributes)."""
    lstm_size: int = 128
    """Hidden size of each LSTM direction."""
    lstm_layers: int = 2
    """Stacked LSTM layers."""
    bidirectional: bool = True
    """Run the LSTM in both directions along the chain."""
    dropout: float = 0.1
    """Dropout between layers and before the head."""
    aa_embed_dim: int = 32
    """Size of the learned amino-acid embedding."""
    decoder: str = "argmax"
    """argmax (per residue), viterbi (topology grammar over the softmax, fixed moves) or crf (learned grammar CRF)."""
    entry_penalty: float = 0.0
    """decoder = viterbi: log-score cost of entering an M or B segment (tune it on the validation fold)."""
    duration_weight: float = 1.0
    """decoder = viterbi: weight of the grammar's segment-length log-priors (helix, strand and signal lengths,
    loops between them as the training folds have them); 0 = any length in range at no cost."""
    beta_offset: float = 0.0
    """decoder = viterbi: log-score added to every path through the beta world (a barrel's protein-level
    evidence; tune it on the validation fold)."""
    min_loop: int = 1
    """decoder = viterbi: shortest loop allowed between two membrane helices (1 = no floor; beta turns stay
    free). Tune it on the validation fold."""
    strand_penalty: float | None = None
    """decoder = viterbi: log-score cost of entering a barrel strand (None: strands pay `entry_penalty`, as in
    configs written before it). Its own number because a 22-strand barrel pays it 22 times: an entry cost that
    keeps spurious helices out under-calls strands (docs/benchmarks.md, issue 27 item 4). Chosen on validation."""
    feature_hydropathy: bool = False
    """Add Kyte-Doolittle hydropathy and its 7- and 19-residue window means to the residue inputs."""
    feature_charge: bool = False
    """Add residue charge (K, R +1; D, E -1) and its 15-residue window mean to the residue inputs."""
    feature_blosum: bool = False
    """Add the residue's BLOSUM62 row (20 values) to the residue inputs."""
    lstm_impl: str = "auto"
    """How the LSTM runs (same parameters, same outputs up to float tolerance, `model.recurrence.ChainLSTM`): padded (one
    unidirectional LSTM per layer and direction on right-padded input; ~11x faster than packing on CPU), packed
    (one bidirectional multi-layer LSTM over packed sequences, cuDNN's fused kernel), or auto: padded on CPU,
    packed on CUDA. The CUDA choice is not measured yet (docs/benchmarks.md "GPU readiness (issue 30)")."""
    lstm_bf16: bool = False
    """Under train.bf16 on CUDA, run the LSTM in bf16 too (False: fp32, TF32 on Ampere+). Open until a GPU run
    measures its speed and accuracy (docs/benchmarks.md "GPU precision (open)")."""

    def __post_init__(self) -> None:
        _check(self.gc_size >= 1, f"model.gc_size must be >= 1, got {self.gc_size}")
        _check(self.gc_layers >= 1, f"model.gc_layers must be >= 1, got {self.gc_layers}")
        _check(self.gc_operator in GC_OPERATORS, f"model.gc_operator must be one of {GC_OPERATORS}, got {self.gc_operator!r}")
        _check(self.lstm_size >= 1, f"model.lstm_size must be >= 1, got {self.lstm_size}")
        _check(self.lstm_layers >= 1, f"model.lstm_layers must be >= 1, got {self.lstm_layers}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.aa_embed_dim >= 1, f"model.aa_embed_dim must be >= 1, got {self.aa_embed_dim}")
        _check(self.decoder in DECODERS, f"model.decoder must be one of {DECODERS}, got {self.decoder!r}")
        _check(self.entry_penalty >= 0 and math.isfinite(self.entry_penalty),
               f"model.entry_penalty must be a finite number >= 0, got {self.entry_penalty}")
        _check(self.duration_weight >= 0 and math.isfinite(self.duration_weight),
               f"model.duration_weight must be a finite number >= 0, got {self.duration_weight}")
        _check(math.isfinite(self.beta_offset), f"model.beta_offset must be a finite number, got {self.beta_offset}")
        _check(self.min_loop >= 1, f"model.min_loop must be >= 1, got {self.min_loop}")
        _check(self.strand_penalty is None or math.isfinite(self.strand_penalty),
               f"model.strand_penalty must be a finite number or none, got {self.strand_penalty}")
        _check(self.lstm_impl in LSTM_IMPLS, f"model.lstm_impl must be one of {LSTM_IMPLS}, got {self.lstm_impl!r}")


@dataclass(kw_only=True, frozen=True, slots=True)
class TrainConfig:
    epochs: int = 10
    """Epochs to train (the total, also when resuming)."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_grad_norm: float = 4.0
    """Clip the global gradient norm to this value (0 = no clipping; statistics are still recorded)."""
    schedule: str = "linear"
    """Learning-rate schedule after warm-up: constant, linear (decay to 0) or cosine."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (fractions allowed)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    label_weights: dict[str, float] = field(default_factory=dict)
    """Per-residue-class loss weights, e.g. {"M" = 1.5}; missing labels weigh 1."""
    seed: int = 0
    """Seed for model init, shuffling and sampling."""
    metric: str = "val_overlap_acc"
    """Metric that picks the best epoch, whose checkpoint is copied to `<run>/best`."""
    mode: str = "max"
    """max or min, for `metric`."""
    checkpoint_every: int = 1
    """Save a checkpoint every N epochs (the last epoch is always saved)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (a restart resumes from the latest); `<run>/best` is kept besides."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda. A Ray worker given GPUs refuses to run on a torch without CUDA
    unless this is cpu (logical GPUs with CPU compute: the fake autoscaler, tests)."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    num_threads: int = 0
    """torch threads per worker (0 = leave torch's default)."""
    init_checkpoint: str = ""
    """Continue from this checkpoint directory (weights, optimiser, epoch); how promotion extends a trial."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"train.lr must be a positive number, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.clip_grad_norm >= 0, f"train.clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        _check(self.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(0.0 <= self.label_smoothing < 1.0, f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name, weight in self.label_weights.items():
            _check(name in LABELS, f"train.label_weights: unknown label {name!r}; labels are {LABELS}")
            _check(weight > 0, f"train.label_weights[{name!r}] must be > 0, got {weight}")
        _check(self.mode in MODES, f"train.mode must be 'max' or 'min', got {self.mode!r}")
        _check(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.num_threads >= 0, f"train.num_threads must be >= 0, got {self.num_threads}")

    @property
    def objective(self) -> Objective:
        """What picks the run's best epoch: `metric`, maximised or minimised as `mode` says."""
        return Objective(self.metric, self.mode)


@dataclass(kw_only=True, frozen=True, slots=True)
class ResourcesConfig:
    num_workers: int = 1
    """Ray Train workers (DDP ranks); 0 runs the loop in the trial's own process."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; fractions only with a single worker (NCCL refuses two ranks on one GPU)."""
    accelerator_type: str = ""
    """Ray accelerator type to pin workers to (e.g. A100), empty = any."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may do before the run fails."""
    trial_max_failures: int = 1
    """Restarts of a failed search trial (Tune, from its latest checkpoint) on an on-demand pool."""
    spot_max_failures: int = 4
    """The same on a spot / preemptible (or mixed) pool, where each preemption is a failure; the stage plan's
    market picks which applies."""
    storage: str = "runs"
    """Where runs, checkpoints and metrics go (local path, or s3:// / gs://). On a cluster of more than one node a
    local path is refused unless shared_storage says every node mounts it."""
    shared_storage: bool = False
    """The local storage path is a mount every node has at the same path (NFS, EFS, Filestore): allowed on a
    multi-node cluster (`--shared-storage`). Object storage needs no declaration."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, f"resources.num_workers must be >= 0, got {self.num_workers}")
        _check(self.cpus_per_worker >= 0, f"resources.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, f"resources.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        fractional = 0 < self.gpus_per_worker < 1 or self.gpus_per_worker != int(self.gpus_per_worker)
        _check(not (fractional and self.num_workers > 1),
               f"resources.gpus_per_worker={self.gpus_per_worker} is a GPU fraction; it is only allowed with one worker "
               f"(got num_workers={self.num_workers}): DDP ranks sharing a GPU fail in NCCL")
        for name in ("max_failures", "trial_max_failures", "spot_max_failures"):
            _check(getattr(self, name) >= -1, f"resources.{name} must be >= -1 (-1 = retry forever)")


@dataclass(kw_only=True, frozen=True, slots=True)
class Config:
    name: str = "run"
    """Run name: the directory under `resources.storage`."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> Config:
        return _build(cls, values, where)

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted-key overrides applied, e.g. {"model.lstm_size": 512}."""
        values = self.to_dict()
        for key, value in overrides.items():
            set_dotted(values, key, value, where="override")
        return Config.from_dict(values, where="override")

    def with_absolute_paths(self) -> Config:
        """A copy whose local data.path and resources.storage are absolute (URIs stay as they are): runs, trials
        and Ray workers open them from other processes and working directories."""
        return self.replace({"data.path": storage.resolve(self.data.path),
                             "resources.storage": storage.resolve(self.resources.storage)})


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "resources": ResourcesConfig}


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def reject_unknown_keys(cls: type, values: Any, where: str) -> None:
    """The one rule for every table read into a dataclass (run sections, [experiment], [prices], [budget]): a key
    that is not a field is a typo, named with the keys that exist."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a (nested) dict, naming the offending key on any error."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    reject_unknown_keys(cls, values, where)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint == float | None:  # TOML has no null: a field left out, or "none" from --set, means None
        return None if value is None or value in ("none", "None", "") else _coerce(float, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return {str(k): float(v) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def set_dotted(values: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set `a.b.c` in a nested dict, creating tables on the way."""
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {key!r} goes through a value that is not a table")
    node[parts[-1]] = value


