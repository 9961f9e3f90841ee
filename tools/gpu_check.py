"""The prepared device check (issue 30): everything a lent GPU machine should measure, in one command.

    python -m tools.gpu_check --stage-carry data/gpu_carry            # here, before: labels + fair-esm to carry
    python -m tools.gpu_check --device cuda --out $OUT                 # on the GPU machine: under 8 minutes
    python -m tools.gpu_check --device cpu --tiny --out /tmp/gpu_check # CI (tests/test_gpu_check.py): well under 60 s

Stages run in child processes (imports, bench and embed together in one, `tools.gpu_measure`: one import of
torch and PyG), each with a timeout drawn from one global budget (`--budget-s`: 450 s on CUDA; 150 s with --tiny,
a ceiling for a loaded CI machine, where it takes ~20-30 s) and killed with its process group when it runs over;
one after another on CUDA (no stage's timings share the machine), side by side where they can with --tiny (CI's
time is mostly imports). Figures go to OUT/<stage>.json,
logs to OUT/logs; OUT/gpu_check.json says per stage ok / failed / timeout / skipped / partial, its seconds and
where its figures are:
- env: Python, torch, CUDA, cuDNN, the GPU; which of Ray, W&B, HyperOpt, Biopython, fair-esm import here;
- imports: the modules this check runs import without Ray, W&B, HyperOpt or Biopython (the GPU image has none);
- prepare: shards with sequence-window graphs (`python -m protopo_ray.prepare --labels`) from DeepTMHMM's
  partitions (../shared/data/deeptmhmm, else data/gpu_carry; --tiny: the 10 shortest proteins per fold); without
  the labels, synthetic proteins written in the same format (marked "synthetic");
- train_seed: the seed's final architecture (GC 64 x 2, LSTM 128 x 4 bidirectional, batch 64, dropout 0.1,
  argmax) for 3 epochs (--tiny: 1) with `python -m protopo_ray.train --local` on the device: train cv0+cv3+cv4,
  validate cv1; per-epoch time, residues/s, validation figures;
- bench: one training step at batch 32 / 64 / 128 (--tiny: 4) x fp32 / bf16 with the LSTM in fp32 / bf16 with
  the LSTM in bf16 (CUDA only) x LSTM path padded / packed on the same batches (`bench_step.device_step`): ms per
  step, residues/s, host syncs per step, peak allocated memory against the planner's estimate; host syncs of the
  step before issue 30 on the same batches; the seed model on one CPU thread for the per-core comparison;
- predict: `python -m protopo_ray.predict` with the seed run's best checkpoint on cv2 (labelled 3-line), metrics;
- embed: the random tiny ESM-2 (`embeddings.write_random_esm2`) and an esm2_t6-sized one embedding cv2 sequences
  on the device; a NEAR embedder where protopo_ray.data has one (else "not available");
- train_quality: experiments/deeptmhmm_quality.toml for 2 epochs (--tiny: 1) on the device.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL_SOURCES = (REPO.parent / "shared" / "data" / "deeptmhmm" / "DeepTMHMM.partitions.json",
                 REPO / "data" / "gpu_carry" / "DeepTMHMM.partitions.json")
CARRY_SITE = REPO / "data" / "gpu_carry" / "site"
ABSENT_ON_GPU = ("ray", "wandb", "hyperopt", "Bio")
FOLDS = {"train_folds": ["cv0", "cv3", "cv4"], "val_folds": ["cv1"], "test_folds": ["cv2"]}
SEED_MODEL = {"gc_size": 64, "gc_layers": 2, "gc_operator": "gcn", "lstm_size": 128, "lstm_layers": 4,
              "bidirectional": True, "dropout": 0.1, "decoder": "argmax"}
#: per-stage caps in seconds (CUDA, --tiny); each stage gets min(cap, what the budget has left)
CAPS = {"prepare": (60, 40), "train_seed": (150, 60), "inprocess": (170, 60), "predict": (45, 40),
        "train_quality": (90, 60)}
#: what tools.gpu_measure measures in one child process, in this order, each in OUT/<name>.json once done
IN_PROCESS = ("imports", "bench", "embed")


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, default=str) + "\n")


def installed(name: str) -> bool:
    """Whether `name` can be imported here (found, not imported: importing Ray alone costs seconds)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it (tests/test_gpu_check.py blocks Ray so)
        return False


def env_figures(device: str) -> dict:
    import numpy
    import pyarrow
    import torch

    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "numpy": numpy.__version__, "pyarrow": pyarrow.__version__, "cpu_count": os.cpu_count(),
               "cuda_available": torch.cuda.is_available(), "device": device,
               "modules": {name: installed(name) for name in (*ABSENT_ON_GPU, "esm", "torch_geometric", "scipy")}}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                       tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return figures


def child_env(tiny: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO)] + ([str(CARRY_SITE)] if CARRY_SITE.is_dir() else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class Stage:
    name: str
    argv: list[str]
    """Arguments of `python` (run from the repository root)."""
    figures: Callable[[], object] | None = None
    """Called once the stage exits 0: what goes into gpu_check.json as its figures (or the file holding them)."""


class Runner:
    """Runs stages as child processes, each in its own process group (killed whole at its timeout: prepare's pool
    workers too), with timeouts from one global budget; records each stage in OUT/gpu_check.json as it ends."""

    def __init__(self, out: Path, budget_s: float, tiny: bool, summary: dict) -> None:
        self.out, self.budget_s, self.tiny, self.summary = out, budget_s, tiny, summary
        self.started = time.monotonic()
        self.env = child_env(tiny)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started) - 2

    def run(self, *stages: Stage) -> dict[str, bool]:
        """Run `stages`: side by side with --tiny (CI's wall time is mostly imports), else one after another so
        that no stage's timings share the machine."""
        if self.tiny:
            return self._run_together(list(stages))
        return {name: ok for stage in stages for name, ok in self._run_together([stage]).items()}

    def _run_together(self, stages: list[Stage]) -> dict[str, bool]:
        launched = []
        for stage in stages:
            timeout = min(CAPS[stage.name][1 if self.tiny else 0], self.left())
            if timeout < 5:
                self.record(stage.name, {"status": "skipped", "reason": "global budget spent"})
                continue
            log = self.out / "logs" / f"{stage.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("w")
            child = subprocess.Popen([sys.executable, *stage.argv], cwd=REPO, env=self.env, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            launched.append((stage, child, handle, log, time.monotonic(), timeout))
        done = {stage.name: False for stage in stages}
        for stage, child, handle, log, began, timeout in launched:
            try:
                status = "ok" if child.wait(timeout=max(0.0, began + timeout - time.monotonic())) == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                status = "timeout"
            handle.close()
            record = {"status": status, "seconds": round(time.monotonic() - began, 2), "timeout_s": round(timeout, 1)}
            if status == "ok" and stage.figures is not None:
                try:
                    record["figures"] = stage.figures()
                except Exception as error:  # noqa: BLE001 - one stage's figures failing must not lose the others
                    record.update(status="failed", error=f"{type(error).__name__}: {error}")
            if record["status"] != "ok":
                record["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            self.record(stage.name, record)
            done[stage.name] = record["status"] == "ok"
        return done

    def record(self, name: str, record: dict) -> None:
        self.summary["stages"][name] = record
        write_json(self.out / "gpu_check.json", self.summary)
        print(f"{name}: {record['status']}" + (f" in {record['seconds']} s" if "seconds" in record else ""), flush=True)


def write_labels(out: Path, tiny: bool) -> tuple[Path, str]:
    """The partitions JSON to prepare (a subset with --tiny) and where it came from."""
    source = next((p for p in LABEL_SOURCES if p.is_file()), None)
    if source is not None and not tiny:
        return source, str(source)
    if source is not None:
        folds = json.loads(source.read_text())
        subset = {fold: sorted(rows, key=lambda r: len(r["sequence"]))[:10] for fold, rows in folds.items()}
        origin = f"{source} (10 shortest per fold)"
    else:  # no real labels here: synthetic proteins in the same format, so the same prepare path runs
        from protopo_ray.data.synthetic import generate_proteins

        records = [r for r, _ in generate_proteins(50 if tiny else 1500, seed=0)]
        subset = {fold: [{"id": r.id, "sequence": r.sequence, "labels": r.labels}
                         for r in records[i::5]] for i, fold in enumerate(("cv0", "cv1", "cv2", "cv3", "cv4"))}
        origin = "synthetic"
    path = out / "work" / "labels.json"
    write_json(path, subset)
    return path, origin


def seed_toml(shards: Path, runs: Path, device: str, tiny: bool) -> str:
    data = {"path": str(shards), **FOLDS, "batch_size": 8 if tiny else 64, "loading": "memory"}
    train = {"epochs": 1 if tiny else 3, "lr": 1e-3, "device": device, "bf16": True, "keep_checkpoints": 1,
             "metric": "val_overlap_acc", "num_threads": 1 if tiny else 0}

    def table(values: dict) -> str:
        return "\n".join(f"{k} = {json.dumps(v).lower() if isinstance(v, bool) else json.dumps(v)}"
                         for k, v in values.items())

    return (f'name = "gpu_seed"\n\n[data]\n{table(data)}\n\n[model]\n{table(SEED_MODEL)}\n\n[train]\n{table(train)}\n\n'
            f'[resources]\nstorage = {json.dumps(str(runs))}\n')


def save_epochs(run_dir: Path, path: Path) -> str:
    """The run's per-epoch figures (its metrics.jsonl, the keys that say how fast and how good) into `path`."""
    write_json(path, epochs_of(run_dir))
    return str(path)


def epochs_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    keep = ("epoch", "epoch_time_s", "train_seconds", "train_residues_per_s", "train_num_residues", "train_loss",
            "train_grad_norm_mean", "train_data_wait_share", "val_loss", "val_overlap_acc", "val_type_acc")
    return [{k: v for k, v in json.loads(line).items() if k in keep} for line in lines]


def write_cv2(shards: Path, path: Path) -> int:
    from protopo_ray.data import shards as shard_io

    table = shard_io.read_table(shards, folds=FOLDS["test_folds"], columns=["id", "type", "sequence", "labels"])
    with path.open("w") as handle:
        for pid, ptype, seq, labels in zip(*(table[c].to_pylist() for c in ("id", "type", "sequence", "labels"))):
            handle.write(f">{pid}|{ptype}\n{seq}\n{labels}\n")
    return table.num_rows


def read_3line(path: Path) -> dict[str, str]:
    """id -> labels of a 3-line file as written, unvalidated (a model's labels may be no valid topology)."""
    lines = path.read_text().splitlines()
    return {lines[i][1:].split("|")[0]: lines[i + 2] for i in range(0, len(lines) - 2, 3)}


def predict_figures(truth: Path, predicted: Path) -> dict:
    from protopo_ray.model.metrics import protein_metrics

    true, pred = read_3line(truth), read_3line(predicted)
    ids = [i for i in true if i in pred]
    return protein_metrics([true[i] for i in ids], [pred[i] for i in ids], ids=ids)


def stage_carry(target: Path) -> int:
    """Copy what the GPU machine lacks into `target` (an ignored path to carry): the labels, fair-esm's package."""
    source = next((p for p in LABEL_SOURCES[:1] if p.is_file()), None)
    target.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copy(source, target / source.name)
    spec = importlib.util.find_spec("esm")
    if spec is not None and spec.submodule_search_locations:
        shutil.copytree(next(iter(spec.submodule_search_locations)), target / "site" / "esm", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    print(f"staged {target}: labels {'yes' if source else 'no'}, fair-esm {'yes' if spec else 'no'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, help="where the JSON figures go (e.g. $OUT on the device machine)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CI on CPU)")
    parser.add_argument("--budget-s", type=float, help="global time budget (default 450 s, --tiny 150 s)")
    parser.add_argument("--stage-carry", type=Path, metavar="DIR", help="copy the labels and fair-esm into DIR")
    args = parser.parse_args()
    if args.stage_carry:
        return stage_carry(args.stage_carry)
    if args.out is None:
        parser.error("--out DIR is required")
    return orchestrate(args)


def orchestrate(args: argparse.Namespace) -> int:
    budget = args.budget_s or (150.0 if args.tiny else 450.0)
    out, work = args.out, args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if CARRY_SITE.is_dir():
        sys.path.insert(0, str(CARRY_SITE))
    summary: dict = {"device": args.device, "tiny": args.tiny, "budget_s": budget, "stages": {}}
    runner = Runner(out, budget, args.tiny, summary)
    summary["env"] = env_figures(args.device)
    print(json.dumps(summary["env"]), flush=True)
    shards, runs, cv2 = work / "shards", work / "runs", work / "cv2.3line"
    labels, summary["data"] = write_labels(out, args.tiny)
    workers = "1" if args.tiny else str(max(1, min(8, (os.cpu_count() or 1) - 1)))
    prepared = runner.run(Stage("prepare", ["-m", "protopo_ray.prepare", "--labels", str(labels), "--out", str(shards),
                                            "--workers", workers, "--overwrite"]))
    if not prepared["prepare"]:
        return finish(summary, out, runner)
    summary["cv2_proteins"] = write_cv2(shards, cv2)
    (work / "seed.toml").write_text(seed_toml(shards, runs, args.device, args.tiny))
    child = ["--device", args.device, "--out", str(out), "--shards", str(shards)] + (["--tiny"] if args.tiny else [])
    runner.run(Stage("train_seed", ["-m", "protopo_ray.train", "--config", str(work / "seed.toml"), "--local"],
                     lambda: save_epochs(runs / "gpu_seed", out / "train_seed.json")),
               Stage("inprocess", ["-m", "tools.gpu_measure", *child]))
    for name in IN_PROCESS:  # each measurement of the in-process child as a stage of its own
        path = out / f"{name}.json"
        if path.is_file():
            runner.record(name, {"status": json.loads(path.read_text())["status"], "figures": str(path)})
        else:  # the child timed out or died before it got here
            runner.record(name, {"status": summary["stages"]["inprocess"]["status"], "reason": "not reached"})
    sets = [f"data.path={shards}", f"train.epochs={1 if args.tiny else 2}", f"train.device={args.device}",
            f"train.num_threads={1 if args.tiny else 0}", f"resources.storage={runs}", "name=gpu_quality"]
    quality = Stage("train_quality", ["-m", "protopo_ray.train", "--config",
                                      str(REPO / "experiments" / "deeptmhmm_quality.toml"), "--local",
                                      *[a for item in sets for a in ("--set", item)]],
                    lambda: save_epochs(runs / "gpu_quality", out / "train_quality.json"))
    predict = Stage("predict", ["-m", "protopo_ray.predict", "--checkpoint", str(runs / "gpu_seed" / "best"), "--input",
                                str(cv2), "--out-dir", str(work / "predict"), "--device", args.device,
                                "--batch-size", "64"],
                    lambda: predict_figures(cv2, work / "predict" / "predicted.3line"))
    if (runs / "gpu_seed" / "best").is_dir():
        runner.run(predict, quality)
    else:
        runner.record("predict", {"status": "skipped", "reason": "train_seed left no best checkpoint"})
        runner.run(quality)
    return finish(summary, out, runner)


def finish(summary: dict, out: Path, runner: Runner) -> int:
    summary["seconds"] = round(time.monotonic() - runner.started, 1)
    write_json(out / "gpu_check.json", summary)
    failed = [n for n, s in summary["stages"].items() if s["status"] != "ok"]
    print(f"gpu_check: {len(summary['stages']) - len(failed)} of {len(summary['stages'])} stages ok in "
          f"{summary['seconds']} s" + (f"; not ok: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
