"""The search's Grafana dashboard, generated from the metric definitions (`monitoring.metrics`) and kept in the
repository as JSON (`DASHBOARD_FILE`); a test checks that the file is this generator's output and that every panel
queries a metric the code emits (or one of Ray's own node metrics).

    python -m protopo_ray.monitoring.grafana                 # rewrite the committed JSON
    python -m protopo_ray.monitoring.grafana --out DIR/FILE  # write it elsewhere, e.g. where Grafana provisions it

Ray's dashboard provisions Grafana from its session directory: `<temp dir>/session_latest/metrics/grafana/` holds
grafana.ini and a provisioning config that loads every JSON in `dashboards/` there (Ray writes its own dashboards
there when the head starts; RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR moves it). A Grafana started with that
grafana.ini shows this dashboard in its "Ray" folder beside Ray's; `provision` copies it there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from protopo_ray.monitoring import metrics as m

DASHBOARD_FILE = Path(__file__).with_name("protopo_search.grafana.json")
DASHBOARD_UID = "protopo-search"
PROVISIONED_NAME = "protopo_search.json"
#: Ray's own per-node metrics the dashboard shows beside the trials' (names as in Ray's default dashboard).
RAY_NODE_METRICS = ("ray_node_cpu_utilization", "ray_node_gpus_utilization", "ray_node_gram_used",
                    "ray_node_mem_used_host")
TRIALS = '{experiment=~"$experiment", stage=~"$stage"}'


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    description: str
    queries: tuple[tuple[str, str], ...]
    """(PromQL, legend) pairs."""
    unit: str = "none"
    stacked: bool = False


def _trial_query(spec: m.MetricSpec, extra_legend: str = "") -> tuple[str, str]:
    return f"{spec.exported}{TRIALS}", "{{stage}} {{trial}} {{member}}" + extra_legend


#: Rows of panels, top to bottom.
ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Trials", (
        Panel("Validation loss per trial", m.VAL_LOSS.description, (_trial_query(m.VAL_LOSS),)),
        Panel("Stage metric per trial", m.STAGE_METRIC.description, (_trial_query(m.STAGE_METRIC, " {{metric}}"),)),
        Panel("Training loss per trial", m.TRAIN_LOSS.description, (_trial_query(m.TRAIN_LOSS),)),
        Panel("Epochs done per trial", m.EPOCH.description, (_trial_query(m.EPOCH),)),
        Panel("Topology accuracy per type", m.TOPOLOGY_ACCURACY.description,
              (_trial_query(m.TOPOLOGY_ACCURACY, " {{type}}"),), unit=m.TOPOLOGY_ACCURACY.unit),
    )),
    ("Stages and budget", (
        Panel("Trials by state", m.STAGE_TRIALS.description,
              (("sum by (stage, state) (" + m.STAGE_TRIALS.exported + TRIALS + ")", "{{stage}} {{state}}"),),
              stacked=True),
        Panel("Spend against the budget", m.SPENT_USD.description,
              ((f"max by (stage) ({m.SPENT_USD.exported}{TRIALS})", "spent (during {{stage}})"),
               (f"max({m.BUDGET_USD.exported}{TRIALS})", "budget max_usd")), unit="currencyUSD"),
        Panel("Dollars per trial", m.TRIAL_USD.description, (_trial_query(m.TRIAL_USD),), unit=m.TRIAL_USD.unit),
        Panel("Device-hours per trial", m.DEVICE_HOURS.description, (_trial_query(m.DEVICE_HOURS),)),
    )),
    ("Throughput and devices", (
        Panel("Residues per second per trial", m.RESIDUES_PER_S.description, (_trial_query(m.RESIDUES_PER_S),)),
        Panel("Data-wait share per trial", m.DATA_WAIT_SHARE.description, (_trial_query(m.DATA_WAIT_SHARE),),
              unit=m.DATA_WAIT_SHARE.unit),
        Panel("Peak memory per trial", m.PEAK_MEMORY.description, (_trial_query(m.PEAK_MEMORY, " {{memory}}"),),
              unit="bytes"),
        Panel("Node CPU utilisation (Ray)", "Ray's own node metric", (("ray_node_cpu_utilization", "{{instance}}"),),
              unit="percent"),
        Panel("Node GPU utilisation (Ray)", "Ray's own node metric, per GPU",
              (("ray_node_gpus_utilization", "{{instance}} GPU {{GpuIndex}}"),), unit="percent"),
        Panel("GPU memory used (Ray)", "Ray's own node metric, per GPU (MiB)",
              (("ray_node_gram_used", "{{instance}} GPU {{GpuIndex}}"),), unit="decmbytes"),
        Panel("Node memory used (Ray)", "Ray's own node metric", (("ray_node_mem_used_host", "{{instance}}"),),
              unit="bytes"),
    )),
)


def _variable(name: str, query: str) -> dict:
    return {"name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "multi": True, "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(panel.queries)],
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": {
            "drawStyle": "line", "lineWidth": 1, "showPoints": "always", "pointSize": 4, "spanNulls": True,
            "fillOpacity": 30 if panel.stacked else 0,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"}}}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def build_dashboard() -> dict:
    """The dashboard as Grafana's JSON model (schema 39: Grafana 10 and later)."""
    panels: list[dict] = []
    y, panel_id = 0, 1
    for title, row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y = panel_id + 1, y + 1
        for i, panel in enumerate(row):
            panels.append(_panel(panel, panel_id, x=8 * (i % 3), y=y + 8 * (i // 3)))
            panel_id += 1
        y += 8 * ((len(row) + 2) // 3)
    templating = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {"selected": False, "text": "Prometheus", "value": "Prometheus"}, "hide": 0},
        _variable("experiment", f"label_values({m.EPOCH.exported}, experiment)"),
        _variable("stage", f'label_values({m.EPOCH.exported}{{experiment=~"$experiment"}}, stage)'),
    ]
    return {"uid": DASHBOARD_UID, "title": "protopo_ray search", "description": "Trials, stages and spend of "
            "protopo_ray searches (generated by protopo_ray.monitoring.grafana; docs/monitoring.md)",
            "tags": ["protopo_ray", "ray"], "editable": True, "schemaVersion": 39, "version": 1,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "browser",
            "templating": {"list": templating}, "panels": panels, "annotations": {"list": []}, "links": []}


def dashboard_json() -> str:
    return json.dumps(build_dashboard(), indent=1, sort_keys=True) + "\n"


def queried_metrics(dashboard: dict) -> set[str]:
    """Every metric name a panel or variable of `dashboard` queries."""
    texts = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    texts += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {name for text in texts for name in re.findall(r"\bray_[A-Za-z0-9_]+", text)}


def provision(session_dir: str | Path) -> Path:
    """Write the dashboard where Grafana, started with Ray's `<session>/metrics/grafana/grafana.ini`, loads it."""
    target = Path(session_dir) / "metrics" / "grafana" / "dashboards" / PROVISIONED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dashboard_json())
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protopo_ray.monitoring.grafana", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help=f"file to write (default: {DASHBOARD_FILE.name} in the package)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else DASHBOARD_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dashboard_json())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
