"""Proteome prediction (issue 29): in-process `predict` against `predict --ray` on one node, on a 2-node
`ray.cluster_utils.Cluster` and on Ray's fake autoscaling cluster from zero workers; peak driver and worker memory
at two input sizes; a `--ray` run killed half-way and resumed against an uninterrupted one.

    nice -n 5 .venv/bin/python -m tools.bench_predict --modes inprocess,ray --sizes 2000,20000
    nice -n 5 .venv/bin/python -m tools.bench_predict --modes cluster2,cluster2x2,fake,resume --sizes 2000
    .venv/bin/python -m tools.bench_predict --modes inprocess --sizes 200 --checkpoint runs/default/winner/checkpoint

Input: a FASTA of N proteins whose lengths are drawn from the DeepTMHMM set's (../shared/data/deeptmhmm, else a
log-normal fitted to it), residues drawn by that set's amino-acid frequencies, plus `LONG_PROTEINS` of 10k+
residues (predicted in windows) and `BAD_RECORDS` a proteome has (rejects.tsv is then one of the compared files).
Checkpoint: --checkpoint, else one trained here for one epoch on the smoke set with the embedded default's model
size (experiments/default.toml's [model]: the architecture and the decoder set the throughput, not the weights).

Modes (each a fresh `python -m protopo_ray.predict` process, OMP_NUM_THREADS=1):
  inprocess  one process, one core;
  ray        --ray, the driver starting its own local cluster (all of this machine's CPUs);
  cluster2   --ray --address of a 2-node cluster_utils.Cluster of 1 CPU each (the plan: 1 network actor);
  cluster2x2 the same with 2 logical CPUs a node (the plan: 2 network actors), oversubscribing 2 real cores;
  fake       --ray on `ray start --head --num-cpus=0 --autoscaling-config=cluster-fake.yaml` (RAY_FAKE_CLUSTER=1):
             the autoscaler starts a worker node for the job (wall includes its start);
  fakeyaml   the same with --cluster cluster-fake.yaml: planned on its GPU node type (logical GPUs);
  resume     --ray killed with SIGKILL once half the shards exist, then the same command again; its outputs
             compared byte for byte with an uninterrupted --ray run and the in-process run.
Memory: every process this tool starts carries a marker in its environment; a poller (psutil, every 0.2 s) takes
the driver's RSS and the sum and the largest RSS of the Ray worker processes (`ray::*`; RSS counts the object-store
pages a worker maps). Prints one JSON row per run and merges them into benchmarks/bench_predict.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DEEPTMHMM = ROOT.parent / "shared" / "data" / "deeptmhmm" / "DeepTMHMM.derived.3line"
OUT_FILES = ("predicted.3line", "predicted.gff3", "summary.tsv", "rejects.tsv")
MARKER = "PROTOPO_BENCH_PREDICT"
#: log(length) mean and sd of the DeepTMHMM set's 3,576 proteins (50-5,478 residues, mean 516), clipped to its range:
#: the fallback where the set is absent.
LOG_LENGTH = (5.950, 0.769, 50, 5478)
#: Amino-acid frequencies of the DeepTMHMM set's sequences.
FREQUENCIES = {"A": 0.0714, "C": 0.0170, "D": 0.0530, "E": 0.0661, "F": 0.0386, "G": 0.0638, "H": 0.0230,
               "I": 0.0499, "K": 0.0608, "L": 0.0935, "M": 0.0220, "N": 0.0461, "P": 0.0546, "Q": 0.0451,
               "R": 0.0508, "S": 0.0847, "T": 0.0565, "V": 0.0613, "W": 0.0120, "Y": 0.0299}
LONG_PROTEINS = (10_500, 14_000, 34_350)  # titin-sized last
BAD_RECORDS = 4  # an illegal letter, a duplicate id; a soft-masked one and a stop are repaired, not rejected


# ------------------------------------------------------------------------------------------------ the input


def sample_lengths(count: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if DEEPTMHMM.exists():
        lines = DEEPTMHMM.read_text().splitlines()
        lengths = np.array([len(lines[i + 1]) for i in range(0, len(lines) - 2, 3) if lines[i].startswith(">")])
        return rng.choice(lengths, size=count), f"the DeepTMHMM set's {len(lengths)} lengths ({DEEPTMHMM.name})"
    mean, sd, lo, hi = LOG_LENGTH
    drawn = np.clip(np.round(np.exp(rng.normal(mean, sd, count))), lo, hi).astype(int)
    return drawn, "a log-normal fitted to the DeepTMHMM set's lengths (the set is absent here)"


def write_fasta(path: Path, count: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths, source = sample_lengths(count, rng)
    letters = np.array(list(FREQUENCIES))
    weights = np.array(list(FREQUENCIES.values()))
    weights = weights / weights.sum()
    path.parent.mkdir(parents=True, exist_ok=True)
    long_at = {int(i * count / len(LONG_PROTEINS)) + count // 7: n for i, n in enumerate(LONG_PROTEINS)}
    residues = 0
    with path.open("w") as handle:
        for i in range(count):
            length = long_at.get(i, int(lengths[i]))
            sequence = "".join(rng.choice(letters, size=length, p=weights))
            name = f"bench{i}"
            if i == 5:
                sequence = sequence[:10] + "#" + sequence[11:]  # rejected: an illegal letter
            elif i == 9:
                name = "bench1"  # rejected: a duplicate id
            elif i == 13:
                sequence = sequence.lower()  # soft-masked: upper-cased
            elif i == 17:
                sequence += "*"  # a translation's stop: dropped
            residues += length
            handle.write(f">{name} synthetic length {length}\n")
            handle.writelines(sequence[j:j + 60] + "\n" for j in range(0, length, 60))
    return {"path": str(path), "proteins": count, "residues": residues, "lengths_from": source,
            "long_proteins": list(LONG_PROTEINS), "bad_records": BAD_RECORDS}


# ------------------------------------------------------------------------------------------- the checkpoint


def default_model_overrides() -> list[str]:
    """--set overrides of every [model] field to the embedded default's (experiments/default.toml over the
    ModelConfig defaults): smoke.toml's own model keys must not leak into the benchmark's."""
    from dataclasses import fields

    from protopo_ray.config import ModelConfig

    chosen = tomllib.loads((ROOT / "experiments" / "default.toml").read_text())["model"]
    out = []
    for f in fields(ModelConfig):
        value = chosen.get(f.name, getattr(ModelConfig(), f.name))
        if value is not None:  # None: the field's default already (TOML has no null)
            out += ["--set", f"model.{f.name}={json.dumps(value)}"]
    return out


def train_checkpoint(work: Path) -> tuple[Path, str]:
    run = work / "runs" / "bench_predict"
    checkpoint = run / "best"
    if not (checkpoint / "meta.json").exists():
        cmd = [sys.executable, "-m", "protopo_ray.train", "--config", "experiments/smoke.toml", "--local",
               "--storage", str(work / "runs"), "--set", "name=bench_predict", "--set",
               f"data.path='{work / 'smoke_data'}'", "--set", "train.epochs=1", "--set", "data.structure_dropout=0.5",
               *default_model_overrides()]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    meta = json.loads((checkpoint / "meta.json").read_text())
    model = meta["config"]["model"]
    described = (f"the embedded default's architecture ({model['gc_operator']} {model['gc_size']} x "
                 f"{model['gc_layers']}, biLSTM {model['lstm_size']} x {model['lstm_layers']}, decoder "
                 f"{model['decoder']}), trained 1 epoch on the 60-protein smoke set")
    return checkpoint, described


# --------------------------------------------------------------------------------------------- the memory


@dataclass
class Peaks:
    """Peak RSS of a driver process and of the Ray worker processes carrying `marker` (polled)."""

    marker: str
    driver: int = 0
    workers_sum: int = 0
    workers_max: int = 0
    num_workers_max: int = 0
    _ours: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _is_ours(self, process: psutil.Process) -> bool:
        if process.pid not in self._ours:
            try:
                self._ours[process.pid] = process.environ().get(MARKER) == self.marker
            except psutil.Error:
                self._ours[process.pid] = False
        return self._ours[process.pid]

    def poll(self, driver_pid: int) -> None:
        while not self._stop.wait(0.2):
            rss = []
            for process in psutil.process_iter():
                if not self._is_ours(process):
                    continue
                try:
                    if process.pid == driver_pid:
                        self.driver = max(self.driver, process.memory_info().rss)
                    elif (process.cmdline() or [""])[0].startswith("ray::"):
                        rss.append(process.memory_info().rss)
                except psutil.Error:
                    continue
            self.workers_sum = max(self.workers_sum, sum(rss))
            self.workers_max = max(self.workers_max, max(rss, default=0))
            self.num_workers_max = max(self.num_workers_max, len(rss))

    def stop(self) -> None:
        self._stop.set()


def marked_pids(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == marker and process.pid != os.getpid():
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def kill_marked(marker: str, wait_s: float = 15.0) -> int:
    """SIGKILL what is left of the processes this tool started under `marker` (after their own shutdown had
    `wait_s` to finish); returns how many were killed."""
    deadline = time.time() + wait_s
    while marked_pids(marker) and time.time() < deadline:
        time.sleep(0.5)
    left = marked_pids(marker)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    return len(left)


# --------------------------------------------------------------------------------------------- the runs


@dataclass
class Run:
    returncode: int
    wall_s: float
    peaks: Peaks
    stdout: str
    stderr: str
    killed_at_shards: int | None = None


def run_predict(cmd: list[str], env: dict, marker: str, kill_at_shards: int | None = None,
                shards_dir: Path | None = None) -> Run:
    env = {**env, MARKER: marker, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = Peaks(marker)
    poller = threading.Thread(target=peaks.poll, args=(proc.pid,), daemon=True)
    poller.start()
    killed = None
    if kill_at_shards is not None:
        while proc.poll() is None:
            done = len(list(shards_dir.glob("part-*.parquet"))) if shards_dir.exists() else 0
            if done >= kill_at_shards:
                proc.send_signal(signal.SIGKILL)
                killed = done
                break
            time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    peaks.stop()
    poller.join()
    return Run(proc.returncode, wall, peaks, stdout, stderr, killed)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_freed(port: int, wait_s: float = 30.0) -> bool:
    deadline = time.time() + wait_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return True
        if time.time() > deadline:
            return False
        time.sleep(1)


def closing_line(text: str) -> str:
    return next((line for line in reversed(text.splitlines()) if line.startswith("wrote ")), "")


def plan_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.startswith("network:")), "")


def row_of(mode: str, fasta: dict, run: Run, cores: int, cmd: list[str], **extra) -> dict:
    if run.returncode != 0:
        raise RuntimeError(f"{mode}: {' '.join(cmd)} exited {run.returncode}:\n{run.stdout[-2000:]}\n"
                           f"{run.stderr[-3000:]}")
    predicted = fasta["proteins"] - 2  # the illegal letter and the duplicate are rejected
    rate = predicted / run.wall_s
    return {"mode": mode, "proteins": fasta["proteins"], "predicted": predicted, "residues": fasta["residues"],
            "wall_s": round(run.wall_s, 1), "proteins_per_s": round(rate, 1), "cores": cores,
            "proteins_per_s_per_core": round(rate / cores, 1), "driver_peak_rss_bytes": run.peaks.driver,
            "workers_peak_rss_sum_bytes": run.peaks.workers_sum, "workers_peak_rss_max_bytes": run.peaks.workers_max,
            "ray_workers_max": run.peaks.num_workers_max, "plan": plan_line(run.stdout),
            "closing": closing_line(run.stdout), "load_average_after": round(os.getloadavg()[0], 2),
            "command": " ".join(cmd).replace(sys.executable, ".venv/bin/python"), **extra}


def predict_cmd(checkpoint: Path, fasta: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "protopo_ray.predict", "--checkpoint", str(checkpoint), "--input", fasta,
            "--out-dir", str(out), "--device", "cpu", *extra]


def same_outputs(a: Path, b: Path) -> dict[str, bool]:
    return {name: (a / name).read_bytes() == (b / name).read_bytes() for name in OUT_FILES}


def mode_inprocess(ctx: dict, fasta: dict, out: Path) -> dict:
    cmd = predict_cmd(ctx["checkpoint"], fasta["path"], out)
    return row_of("inprocess", fasta, run_predict(cmd, ctx["env"], ctx["marker"]), 1, cmd)


def mode_ray(ctx: dict, fasta: dict, out: Path) -> dict:
    cmd = predict_cmd(ctx["checkpoint"], fasta["path"], out, "--ray")
    run = run_predict(cmd, {**ctx["env"], "RAY_ADDRESS": "local"}, ctx["marker"])
    kill_marked(ctx["marker"])
    return row_of("ray", fasta, run, os.cpu_count() or 1, cmd)


def mode_cluster(ctx: dict, fasta: dict, out: Path, cpus_per_node: int) -> dict:
    from ray.cluster_utils import Cluster

    os.environ[MARKER] = ctx["marker"]  # the nodes are this process's children and inherit it
    os.environ.setdefault("RAY_worker_niceness", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        cmd = predict_cmd(ctx["checkpoint"], fasta["path"], out, "--ray", "--address", cluster.address)
        run = run_predict(cmd, ctx["env"], ctx["marker"])
    finally:
        cluster.shutdown()
        os.environ.pop(MARKER, None)
    kill_marked(ctx["marker"])
    name = "cluster2" if cpus_per_node == 1 else f"cluster2x{cpus_per_node}"
    return row_of(name, fasta, run, min(2 * cpus_per_node, os.cpu_count() or 1), cmd,
                  nodes=2, logical_cpus_per_node=cpus_per_node)


def mode_fake(ctx: dict, fasta: dict, out: Path, plan_from_yaml: bool = False) -> dict:
    """The project's cluster-fake.yaml: a CPU-0 head, worker nodes (2 CPUs, 2 logical GPUs: the network runs on the
    CPU) at min_workers 0, started by the autoscaler when the job asks for them. A local `ray start` writes no
    bootstrap config, so the planner sees the live head alone (0 CPUs: one CPU actor); `plan_from_yaml` passes
    --cluster cluster-fake.yaml, as the project's tune job does, and the plan is the GPU node type's."""
    if not port_freed(6379):  # a fake cluster this tool just stopped lets go of it within seconds
        raise RuntimeError("port 6379 is taken by another Ray cluster; the fake nodes need the default GCS port")
    bin_dir = Path(sys.executable).parent
    env = {**ctx["env"], "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", MARKER: ctx["marker"]}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run([str(bin_dir / "ray"), "start", "--head", "--port=6379", "--num-cpus=0",
                        '--resources={"driver": 8}', f"--autoscaling-config={ROOT / 'cluster-fake.yaml'}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                        f"--dashboard-agent-listen-port={free_port()}"],
                       env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}, check=True,
                       capture_output=True, timeout=120)
        cmd = predict_cmd(ctx["checkpoint"], fasta["path"], out, "--ray", "--address", "127.0.0.1:6379",
                          *(["--cluster", str(ROOT / "cluster-fake.yaml")] if plan_from_yaml else []))
        run = run_predict(cmd, env, ctx["marker"])
    finally:
        kill_marked(ctx["marker"], wait_s=0)  # no `ray stop`: it would stop other sessions' clusters too
        port_freed(6379)
    return row_of("fakeyaml" if plan_from_yaml else "fake", fasta, run, 2, cmd,
                  started_from="0 worker nodes (head: 0 CPUs)")


def mode_resume(ctx: dict, fasta: dict, out: Path, reference: Path, inprocess: Path | None) -> dict:
    from protopo_ray.inference.inputs import read_units

    units = sum(1 for _ in read_units(fasta["path"], 0))
    cmd = predict_cmd(ctx["checkpoint"], fasta["path"], out, "--ray")
    env = {**ctx["env"], "RAY_ADDRESS": "local"}
    killed = run_predict(cmd, env, ctx["marker"], kill_at_shards=math.ceil(units / 2), shards_dir=out / "shards")
    leftovers = kill_marked(ctx["marker"])
    after_kill = len(list((out / "shards").glob("part-*.parquet")))  # a shard may land between the count and the kill
    resumed = run_predict(cmd, env, ctx["marker"])
    kill_marked(ctx["marker"])
    resumed_line = next((line for line in resumed.stdout.splitlines() if line.startswith("resuming:")), "")
    identical = same_outputs(out, reference)
    row = row_of("resume", fasta, resumed, os.cpu_count() or 1, cmd, units=units,
                 killed_after_s=round(killed.wall_s, 1), killed_at_shards=killed.killed_at_shards,
                 shards_after_kill=after_kill, killed_returncode=killed.returncode, leftover_processes_killed=leftovers,
                 resuming_line=resumed_line, identical_to_uninterrupted_ray=identical,
                 identical_to_inprocess=same_outputs(out, inprocess) if inprocess else None)
    print(f"resume: killed at {after_kill}/{units} shards after {killed.wall_s:.1f} s; {resumed_line}; "
          f"byte-identical to the uninterrupted --ray run: {identical}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="inprocess,ray,cluster2,cluster2x2,fake,fakeyaml,resume")
    parser.add_argument("--sizes", default="2000,20000", help="proteins per FASTA (comma-separated)")
    parser.add_argument("--checkpoint", help="a predictor (default: one trained here, see above)")
    parser.add_argument("--work", default="/tmp/bench_predict", help="FASTAs, outputs and the trained checkpoint")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "bench_predict.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        checkpoint, model = Path(args.checkpoint), f"--checkpoint {args.checkpoint}"
    else:
        checkpoint, model = train_checkpoint(work)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ctx = {"checkpoint": checkpoint, "env": env, "marker": f"{os.getpid()}-{time.time_ns()}"}
    path = Path(args.json)
    record = json.loads(path.read_text()) if path.exists() else {"runs": []}
    record.update(model=model, machine=f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    print(f"model: {model}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        fasta_path = work / f"proteome{size}.fasta"
        fasta = write_fasta(fasta_path, size)
        record.setdefault("inputs", {})[str(size)] = {k: v for k, v in fasta.items() if k != "path"}
        outs = {}
        for mode in args.modes.split(","):
            out = work / f"out_{mode}_{size}"
            shutil.rmtree(out, ignore_errors=True)
            load = round(os.getloadavg()[0], 2)
            if mode == "inprocess":
                row = mode_inprocess(ctx, fasta, out)
            elif mode == "ray":
                row = mode_ray(ctx, fasta, out)
            elif mode.startswith("cluster2"):
                row = mode_cluster(ctx, fasta, out, 1 if mode == "cluster2" else int(mode.split("x")[-1]))
            elif mode in ("fake", "fakeyaml"):
                row = mode_fake(ctx, fasta, out, plan_from_yaml=mode == "fakeyaml")
            elif mode == "resume":
                reference = outs.get("ray") or work / f"out_ray_{size}"
                if not (reference / "summary.tsv").exists():
                    mode_ray(ctx, fasta, reference)
                inprocess = outs.get("inprocess") or work / f"out_inprocess_{size}"
                row = mode_resume(ctx, fasta, out, reference,
                                  inprocess if (inprocess / "summary.tsv").exists() else None)
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            row["load_average_before"] = load
            if mode != "inprocess" and "inprocess" in outs:
                row["identical_to_inprocess"] = same_outputs(out, outs["inprocess"])
            outs[mode] = out
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
            record["runs"] = [r for r in record["runs"] if (r["mode"], r["proteins"]) != (mode, size)] + [row]
            path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
