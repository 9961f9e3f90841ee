"""What `predict` and evaluation run: one checkpoint, or an ensemble of them (`load_predictor`).

An ensemble directory holds `ensemble.json`, {"members": [checkpoint dirs, relative to it or absolute],
"decoding": {entry_penalty, duration_weight, beta_offset, min_loop, rule}}, beside its members' checkpoints.
`build_ensemble` makes one from fold-rotation members (each trained with a different validation fold) and chooses
its decoding out of fold: every member decodes its own validation fold, which it never trained on, and the
settings with the best topo_mean over those pooled predictions (each rotated fold once) are kept. The members'
averaged posteriors are a little softer than one member's, so this is a choice for one member applied to their
mean: the one approximation of the rule (`protopo_ray.model.ensemble`), taken so that no protein is scored by a
model that trained on it. For the same reason the rule itself (mean or vote) cannot be chosen out of fold on a
fold rotation (every protein has one member that did not train on it): it is the stage's setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protopo_ray.config import Config
from protopo_ray.data import storage
from protopo_ray.model.ensemble import (
    DecodingChoice,
    Ensemble,
    choose_decoding,
    ensemble_grammar,
    mean_log_posteriors,
)
from protopo_ray.model.grammar import Decoding
from protopo_ray.training import loop
from protopo_ray.training.checkpoint import META_FILE, CheckpointError, ModelInputs, load_checkpoint, write_meta
from protopo_ray.training.splits import local_split
from protopo_ray.training.structure_dropout import all_sequence

ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"


@dataclass(kw_only=True)
class Predictor:
    """A trained predictor ready to run: the module (a `TopologyModel` or an `Ensemble`), in eval mode."""

    module: nn.Module
    config: Config
    """The config of the (first) member: its data, decoder and graph settings."""
    inputs: ModelInputs
    """How its input graphs must be built (graph k, features), the same for every member."""
    path: Path


def read_ensemble(directory: str | Path) -> tuple[list[Path], Decoding]:
    """(member checkpoint directories, decoding) of an ensemble directory."""
    directory = Path(directory)
    spec = json.loads((directory / ENSEMBLE_FILE).read_text())
    members = [Path(m) if os.path.isabs(m) else directory / m for m in spec.get("members", [])]
    if not members:
        raise ValueError(f"{directory / ENSEMBLE_FILE}: 'members' lists no checkpoint directory")
    # Ensembles written before the decoding had more than one number held its entry penalty alone.
    decoding = spec.get("decoding") or {"entry_penalty": spec.get("entry_penalty", 0.0), "duration_weight": 0.0}
    return members, Decoding.from_json(decoding)


def write_ensemble(directory: str | Path, members: list[str | Path], decoding: Decoding | None = None) -> Path:
    """Write `directory/ensemble.json` naming `members` (stored relative to `directory` where possible)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [os.path.relpath(Path(m).resolve(), directory.resolve()) for m in members]
    path = directory / ENSEMBLE_FILE
    path.write_text(json.dumps({"members": names, "decoding": (decoding or Decoding()).to_json()}, indent=1) + "\n")
    return path


def load_predictor(path: str | Path, device: torch.device | str = "cpu") -> Predictor:
    """A checkpoint directory -> its model, decoding as its config says; an ensemble directory -> an `Ensemble`
    of its members. Every checkpoint goes through `load_checkpoint`; members must agree on their inputs."""
    path = Path(path)
    if (path / ENSEMBLE_FILE).exists():
        members, decoding = read_ensemble(path)
        loaded = [load_checkpoint(member) for member in members]
        inputs = loaded[0].meta.inputs
        for checkpoint in loaded[1:]:
            other = checkpoint.meta.inputs
            if (other.graph_k, other.node_features, other.embedding_dim) != (inputs.graph_k, inputs.node_features,
                                                                             inputs.embedding_dim):
                raise CheckpointError(f"{path}: member {checkpoint.path} was trained on other inputs than "
                                      f"{loaded[0].path} (graph k, node features, embeddings); an ensemble needs one "
                                      f"input")
        module: nn.Module = Ensemble([checkpoint.model() for checkpoint in loaded], decoding)
        config = loaded[0].config
    elif (path / META_FILE).exists():
        checkpoint = load_checkpoint(path)
        module, config, inputs = checkpoint.model(), checkpoint.config, checkpoint.meta.inputs
    else:
        raise FileNotFoundError(f"{path}: neither a checkpoint ({META_FILE}) nor an ensemble ({ENSEMBLE_FILE})")
    inputs.check_builds_here(str(path))
    return Predictor(module=module.to(device).eval(), config=config, inputs=inputs, path=path)


@dataclass(frozen=True, kw_only=True)
class EnsembleMember:
    fold: str
    """Its validation fold (it trained on the other rotated folds)."""
    trial_id: str
    checkpoint: str
    """Its checkpoint: a local path or a URI."""


def build_ensemble(members: list[EnsembleMember], target: Path, rule: str = "mean") -> DecodingChoice:
    """Copy each member's checkpoint to target/members/<fold>/, choose the decoding out of fold (the ensemble
    decodes by `rule`), write target/ensemble.json."""
    shutil.rmtree(target, ignore_errors=True)
    batches, log_probs, models = [], [], []
    for member in members:
        local = target / MEMBERS_DIR / member.fold
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(storage.fetch_dir(member.checkpoint, Path(tmp) / "checkpoint"), local)
        checkpoint = load_checkpoint(local)
        model = checkpoint.model()
        models.append(model)
        # The member's own validation fold: out of its fold by construction.
        own = list(loop.collated(local_split(checkpoint.config, "val", mode="memory").eval_batches(0, 1), depth=0))
        with torch.no_grad():
            log_probs += [mean_log_posteriors([model.label_posteriors(b, model(b).float())]) for b in own]
        batches += own
    choice = choose_decoding(batches, log_probs, grammar=ensemble_grammar(models), start=Decoding(rule=rule))
    write_ensemble(target, [target / MEMBERS_DIR / m.fold for m in members], choice.decoding)
    return choice


def choose_checkpoint_decoding(path: str | Path) -> DecodingChoice:
    """Choose a decoder = viterbi checkpoint's free decoding numbers (entry penalty, helix-loop floor, strand
    penalty, beta offset) on its own validation folds, as an ensemble's are chosen out of fold, and write them into
    the checkpoint's config (model.entry_penalty, model.min_loop, model.strand_penalty, model.beta_offset): predict
    and evaluation then decode with them. The training run decoded validation with the config's values; those only
    ranked epochs. A model trained for both graph kinds (`data.structure_dropout`) is chosen for both: the
    validation proteins through their shard graphs and again through the sequence-window graphs a FASTA gets,
    pooled, so the numbers do not favour one kind of input."""
    checkpoint = load_checkpoint(path)
    if checkpoint.config.model.decoder != "viterbi":
        raise ValueError(f"{path}: decoder {checkpoint.config.model.decoder!r} has no free decoding numbers "
                         f"(only decoder = viterbi decodes with chosen ones)")
    model = checkpoint.model()
    config = checkpoint.config.replace({"data.max_proteins": 0})
    split = local_split(config, "val", mode="memory")
    views = [split.eval_batches(0, 1)]
    if checkpoint.meta.inputs.structure_dropout > 0:
        k = checkpoint.meta.inputs.graph_k
        views.append(all_sequence(table, k) for table in split.eval_batches(0, 1))
    batches = [batch for view in views for batch in loop.collated(view, depth=0)]
    with torch.no_grad():
        log_probs = [mean_log_posteriors([model.label_posteriors(b, model(b).float())]) for b in batches]
    choice = choose_decoding(batches, log_probs, grammar=model.grammar, start=model.decoding)
    chosen = choice.decoding
    config = checkpoint.config.replace({"model.entry_penalty": chosen.entry_penalty, "model.min_loop": chosen.min_loop,
                                        "model.strand_penalty": chosen.strand_penalty,
                                        "model.beta_offset": chosen.beta_offset})
    write_meta(path, dataclasses.replace(checkpoint.meta, config=config))
    return choice
