"""The README's commands, as a new user types them: every `python -m protopo_ray.<verb>` line parses with that
entry point's own parser, and the in-process path runs as written in a fresh directory (no data prepared
beforehand): train the smoke config, then predict with its checkpoint on a FASTA file, all outputs written."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    block = (REPO / "README.md").read_text().split("## Using it", 1)[1].split("```", 2)[1]
    commands = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("python -m protopo_ray."):
            line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # optional parts as if given
            commands.append(shlex.split(line)[2:])
    return commands


def test_readme_lists_every_entry_point():
    verbs = {argv[0] for argv in readme_commands()}
    assert {"protopo_ray.prepare", "protopo_ray.train", "protopo_ray.tune", "protopo_ray.report",
            "protopo_ray.predict"} <= verbs


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv):
    import importlib

    module = importlib.import_module(argv[0])
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    if parser is None:  # entry points that build their parser inside main(): --help must exit 0 and list the flags
        done = subprocess.run([sys.executable, "-m", argv[0], "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert flag in done.stdout, f"{flag} is not a flag of {argv[0]}"
        return
    parser.parse_args(argv[1:])  # SystemExit (exit 2) on an unknown flag or a missing argument


def test_train_then_predict_as_written_in_a_fresh_directory(tmp_path):
    work = tmp_path / "clone"
    (work / "experiments").mkdir(parents=True)
    shutil.copy(REPO / "experiments" / "smoke.toml", work / "experiments" / "smoke.toml")
    env_cmd = [sys.executable, "-m"]
    train = subprocess.run([*env_cmd, "protopo_ray.train", "--config", "experiments/smoke.toml", "--local",
                            "--set", "train.epochs=1"], cwd=work, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert (work / "data" / "smoke" / "manifest.json").exists()  # the embedded default was made on the way
    checkpoint = next((work / "runs").rglob("best/meta.json")).parent
    (work / "proteins.fasta").write_text(">P1\nMKTLLILAVVAAALAVPSFAQEGKLLVLLVLGLLAG\n>P2\nMSDNQKSLLEKAKELLG\n")
    predict = subprocess.run([*env_cmd, "protopo_ray.predict", "--checkpoint", str(checkpoint), "--input",
                              "proteins.fasta", "--out-dir", "predictions", "--plots", "--allow-input-shift"], cwd=work, capture_output=True,
                             text=True, timeout=600)
    assert predict.returncode == 0, predict.stdout[-2000:] + predict.stderr[-2000:]
    out = work / "predictions"
    assert {"predicted.3line", "predicted.gff3", "summary.tsv"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "plots").glob("*.png"))) == 2
