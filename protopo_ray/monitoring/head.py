"""Prometheus and Grafana on a cluster's head, on Ray's own configuration (cluster.yaml and cluster-gcp.yaml run it
after `ray start --head`; the project image carries both binaries, Dockerfile):

    python -m protopo_ray.monitoring.head [--temp-dir /tmp/ray] [--grafana-home /opt/grafana]

It waits for the session's metrics configuration that the head's dashboard writes, puts the search's dashboard where
Ray's Grafana provisioning loads dashboards (`grafana.provision`), then starts, detached, Prometheus on
127.0.0.1:9090 with Ray's scrape configuration (every node's metrics port, from the session's service-discovery file)
and Grafana on 127.0.0.1:3000 with Ray's grafana.ini (anonymous viewer, embedding allowed, Ray's dashboards and this
one). The head's `ray start` names both (RAY_PROMETHEUS_HOST, RAY_GRAFANA_HOST, RAY_GRAFANA_IFRAME_HOST) so the
dashboard's Metrics view shows their panels. Logs go to the session's logs/ beside Ray's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from protopo_ray.monitoring.grafana import provision
from protopo_ray.monitoring.prometheus import PrometheusError, find_prometheus, scrape_config

PROMETHEUS_ADDRESS = "127.0.0.1:9090"
GRAFANA_PORT = 3000


def monitoring_commands(session_dir: Path, *, prometheus: str, grafana_home: Path) -> dict[str, list[str]]:
    """The argv of Prometheus and of Grafana for the session at `session_dir` (its metrics/ written by Ray)."""
    grafana_ini = session_dir / "metrics" / "grafana" / "grafana.ini"
    return {
        "prometheus": [prometheus, f"--config.file={scrape_config(session_dir)}",
                       f"--storage.tsdb.path={session_dir / 'metrics' / 'prometheus' / 'data'}",
                       f"--web.listen-address={PROMETHEUS_ADDRESS}"],
        "grafana": [str(grafana_home / "bin" / "grafana"), "server", "--homepath", str(grafana_home), "--config",
                    str(grafana_ini), "cfg:server.http_addr=127.0.0.1", f"cfg:server.http_port={GRAFANA_PORT}"],
    }


def start_detached(name: str, argv: list[str], logs: Path) -> int:
    """Start `argv` in a session of its own (it outlives this command), output to logs/<name>.log; its pid."""
    with open(logs / f"{name}.log", "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True).pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.monitoring.head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temp-dir", default="/tmp/ray", help="Ray's temp directory (ray start --temp-dir)")
    parser.add_argument("--grafana-home", default="/opt/grafana", help="Grafana's install directory")
    args = parser.parse_args(argv)
    session = (Path(args.temp_dir) / "session_latest").resolve()
    grafana_home = Path(args.grafana_home)
    try:
        commands = monitoring_commands(session, prometheus=find_prometheus(), grafana_home=grafana_home)
    except PrometheusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not (grafana_home / "bin" / "grafana").exists():
        print(f"error: no Grafana in {grafana_home} (the project image carries it: Dockerfile)", file=sys.stderr)
        return 2
    print(f"Grafana dashboard: {provision(session)}")
    logs = session / "logs"
    print(f"Prometheus: http://{PROMETHEUS_ADDRESS} (pid {start_detached('prometheus', commands['prometheus'], logs)})")
    print(f"Grafana: http://127.0.0.1:{GRAFANA_PORT} (pid {start_detached('grafana', commands['grafana'], logs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
