"""tools/gpu_check.py, the prepared device check, on CPU with tiny sizes and without Ray, W&B, HyperOpt or
Biopython importable (as on the GPU image): every stage ends ok and writes the figures the GPU run would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Put first on PYTHONPATH, this makes the modules the GPU image lacks unimportable in every process of the check.
BLOCKER = '''import sys


class _AbsentOnGpu:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "wandb", "hyperopt", "Bio"}:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU image has none)", name=name)
        return None


sys.meta_path.insert(0, _AbsentOnGpu())
'''


def test_gpu_check_runs_on_cpu_without_ray(tmp_path):
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    summary = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + json.dumps(summary["stages"])[-3000:]
    assert not any(summary["env"]["modules"][m] for m in ("ray", "wandb", "hyperopt", "Bio"))  # the blocker works
    assert summary["env"]["torch"] and summary["seconds"] < summary["budget_s"] <= 150
    stages = summary["stages"]
    assert {n for n, s in stages.items() if s["status"] == "ok"} == {
        "prepare", "train_seed", "inprocess", "imports", "bench", "embed", "predict", "train_quality"}

    seed = json.loads((out / "train_seed.json").read_text())
    assert len(seed) == 1 and seed[0]["train_residues_per_s"] > 0 and 0 <= seed[0]["val_overlap_acc"] <= 1
    quality = json.loads((out / "train_quality.json").read_text())
    assert len(quality) == 1 and quality[0]["epoch_time_s"] > 0

    bench = json.loads((out / "bench.json").read_text())
    assert {(s["lstm_impl"], s["precision"]) for s in bench["steps"]} == {("padded", "fp32"), ("packed", "fp32")}
    for step in bench["steps"]:
        assert step["residues_per_s"] > 0 and step["planned_bytes"] > 0 and step["max_memory_allocated"] is None
        assert step["syncs_per_step"] == 0  # sequence-window graphs (the synthetic fallback too), either path
    assert bench["host_syncs_before_vs_now"]["before"]["per_step"] >= 4
    assert bench["host_syncs_before_vs_now"]["now"]["per_step"] == 0

    embed = json.loads((out / "embed.json").read_text())
    assert embed["tiny_2x16"]["finite"] and embed["tiny_2x16"]["output_dtype"] == "float16"
    assert embed["near"]["available"] in (True, False)

    metrics = stages["predict"]["figures"]
    assert metrics["n_proteins"] == summary["cv2_proteins"] > 0 and 0 <= metrics["overlap_acc"] <= 1
