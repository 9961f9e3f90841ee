"""A local Prometheus for a search's lifetime (`python -m protopo_ray.tune ... --prometheus`): the `prometheus`
binary on PATH (Debian's `prometheus` package, or the release binary from prometheus.io) started on Ray's own scrape
configuration, `<session>/metrics/prometheus/prometheus.yml`, which finds every node's metrics port through the
session's service-discovery file; its data in a temporary directory, removed when it stops."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DEFAULT_PORT = 9090
"""Where Ray's dashboard looks for Prometheus unless RAY_PROMETHEUS_HOST says otherwise."""


class PrometheusError(RuntimeError):
    """No Prometheus to start, or one that did not come up."""


def find_prometheus() -> str:
    """The `prometheus` binary on PATH, else PrometheusError saying how to get one."""
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("--prometheus needs the `prometheus` binary on PATH: `apt-get install prometheus` "
                              "(Debian / Ubuntu), or the release from https://prometheus.io/download/ unpacked onto PATH")
    return found


def pick_port(preferred: int = DEFAULT_PORT) -> int:
    """`preferred` when free on 127.0.0.1 (Ray's dashboard finds it there by default), else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise PrometheusError("no free port on 127.0.0.1 for Prometheus")


def scrape_config(session_dir: str | Path) -> Path:
    """Ray's Prometheus configuration of the session (written by the head's dashboard when it starts)."""
    path = Path(session_dir) / "metrics" / "prometheus" / "prometheus.yml"
    deadline = time.time() + 30
    while not path.exists() and time.time() < deadline:  # the dashboard writes it just after the head starts
        time.sleep(0.5)
    if not path.exists():
        raise PrometheusError(f"{path} does not exist: the cluster's head runs without Ray's dashboard "
                              "(ray[default]), which writes the scrape configuration")
    return path


def _end_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the search's process dies, also when it is killed outright."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def local_prometheus(session_dir: str | Path, port: int | None = None, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """Run Prometheus on 127.0.0.1:`port` scraping the session's nodes; yields its URL, stops it on exit."""
    binary = find_prometheus()
    config = scrape_config(session_dir)
    port = port or pick_port()
    data = Path(tempfile.mkdtemp(prefix="protopo-prometheus-"))
    url = f"http://127.0.0.1:{port}"
    with open(data / "prometheus.log", "wb") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=_end_with_parent)
    try:
        deadline = time.time() + ready_timeout_s
        while True:
            if process.poll() is not None:
                tail = (data / "prometheus.log").read_text(errors="replace")[-1500:]
                raise PrometheusError(f"{binary} exited with {process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise PrometheusError(f"Prometheus at {url} not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(data, ignore_errors=True)
