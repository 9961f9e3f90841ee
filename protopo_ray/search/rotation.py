"""Fold-rotation ensembles: a stage kind that trains one config once per validation fold, and the predictor it makes.

    [[stages]]
    name = "ensemble"
    kind = "ensemble"
    folds = ["cv1", "cv0"]      # each member's validation fold (default: every train + val fold in turn)
    max_epochs = 20

Member k validates on `folds[k]` and trains on the rest of the base config's train + val folds; the test folds stay
out of every member. The members run as the stage's Tune trials, in parallel as far as the plan allows (one Ray
Train DDP run each where the plan gives a trial several workers), every one to the full epoch budget: they do not
compete, so no scheduler stops them. Each keeps its best epoch by the stage metric on its own fold.

Afterwards `build_ensemble` copies the members' best checkpoints into EXP/ensemble/ and chooses the ensemble's
entry penalty (the one free number of `protopo_ray.model.ensemble`'s rule) out of fold: every member decodes its own
validation fold, which it never trained on, and the penalty with the best topo_mean over those pooled
predictions (each rotated fold once) is kept. Nothing is read from the test folds. The members' averaged
posteriors are a little softer than one member's, so this is a choice for one member applied to their mean: the
one approximation of the rule, taken so that no protein is scored by a model that trained on it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protopo_ray.config import Config
from protopo_ray.data import storage

if TYPE_CHECKING:
    from protopo_ray.search.experiment import StageSpec
    from protopo_ray.search.trials import StageRecord

ROTATION_KEY = "val_fold"  # the Tune parameter of an ensemble member: its validation fold
ENSEMBLE_DIR = "ensemble"


def rotation_pool(base: Config) -> tuple[str, ...]:
    """The folds members may train or validate on: the base's train and val folds (never its test folds)."""
    return tuple(dict.fromkeys(base.data.train_folds + base.data.val_folds))


def check_folds(stage: StageSpec, base: Config, where: str) -> None:
    pool = rotation_pool(base)
    folds = stage.folds
    unknown = [f for f in folds if f not in pool]
    if unknown:
        raise ValueError(f"{where}: ensemble stage {stage.name!r} folds {unknown} are not train or val folds of the "
                         f"base config ({list(pool)}); test folds never rotate in")
    if len(set(folds)) != len(folds):
        raise ValueError(f"{where}: ensemble stage {stage.name!r} lists a fold twice: {list(folds)}")
    if len(pool) < 2:
        raise ValueError(f"{where}: ensemble stage {stage.name!r} needs at least two train + val folds to rotate, "
                         f"the base config has {list(pool)}")


def member_overrides(base: Config, val_fold: str) -> dict[str, Any]:
    """The run-config change that makes the member validating on `val_fold`."""
    return {"data.val_folds": [val_fold], "data.train_folds": [f for f in rotation_pool(base) if f != val_fold]}


@dataclass(kw_only=True)
class EnsembleRecord:
    """What an ensemble stage made (in its stage record): where the predictor is and how it was chosen."""

    path: str
    """EXP/ensemble: ensemble.json and members/<val fold>/ (each member's best checkpoint)."""
    members: dict[str, str] = field(default_factory=dict)
    """validation fold -> the trial id whose best checkpoint is that member."""
    entry_penalty: float = 0.0
    out_of_fold: dict[str, float] = field(default_factory=dict)
    """Figures of the pooled out-of-fold predictions decoded at the chosen penalty."""
    topo_mean_by_penalty: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, values: dict[str, Any] | None) -> EnsembleRecord | None:
        if not values:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def build_ensemble(record: StageRecord, exp_dir: Path) -> EnsembleRecord:
    """Copy each member's best checkpoint to EXP/ensemble/members/<fold>/, choose the entry penalty out of fold,
    write ensemble.json. Raises if a member has no checkpoint (the stage's record says why it ended)."""
    import torch

    from protopo_ray.model.ensemble import choose_entry_penalty, load_model, mean_log_posteriors, write_ensemble
    from protopo_ray.training import fit, splits

    target = exp_dir / ENSEMBLE_DIR
    shutil.rmtree(target, ignore_errors=True)
    members: dict[str, str] = {}
    batches, log_probs = [], []
    for trial in record.trials:
        fold = trial.params.get(ROTATION_KEY)
        best = storage.join(trial.run_uri, "best")
        source = best if storage.exists(storage.join(best, "meta.json")) else trial.checkpoint
        if not source:
            raise RuntimeError(f"ensemble stage {record.stage!r}: member {trial.trial_id} (validation fold {fold}) "
                               f"has no checkpoint ({trial.status}: {trial.error or 'no epoch finished'}); "
                               f"rerun the stage with --resume")
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(storage.fetch_dir(source, Path(tmp) / "checkpoint"), target / "members" / fold)
        members[fold] = trial.trial_id
        model, config = load_model(target / "members" / fold)
        # The member's own validation fold: out of its fold by construction.
        own = list(fit.collated(splits.local_split(config, "val", mode="memory").eval_batches(0, 1), depth=0))
        with torch.no_grad():
            log_probs += [mean_log_posteriors([model.label_posteriors(b, model(b).float())]) for b in own]
        batches += own
    penalty, by_penalty, figures = choose_entry_penalty(batches, log_probs)
    write_ensemble(target, [target / "members" / fold for fold in members], penalty)
    return EnsembleRecord(path=str(target), members=members, entry_penalty=penalty, out_of_fold=figures,
                          topo_mean_by_penalty={str(p): v for p, v in by_penalty.items()})


def evaluate_ensemble(path: str | Path, config: Config, split: str = "test") -> dict[str, float]:
    """The ensemble predictor's figures on a split of `config`'s data (the winner's test row)."""
    import torch

    from protopo_ray.model.ensemble import load_predictor
    from protopo_ray.training.fit import evaluate_split
    from protopo_ray.training.splits import local_split

    predictor, _ = load_predictor(path)
    return evaluate_split(predictor, local_split(config, split), config, torch.device("cpu"))
