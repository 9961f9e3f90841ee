"""The search's live metrics and their Grafana dashboard (protopo_ray/monitoring): the committed dashboard is the
generator's output and queries only metrics the code emits; what emitting costs; --prometheus without a binary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from protopo_ray.monitoring import grafana, metrics

REPO = Path(__file__).resolve().parents[1]


def test_committed_dashboard_is_the_generators_output():
    assert grafana.DASHBOARD_FILE.read_text() == grafana.dashboard_json(), \
        "run `python -m protopo_ray.monitoring.grafana` and commit protopo_search.grafana.json"


def test_every_panel_queries_an_emitted_metric_and_every_metric_has_a_panel():
    dashboard = json.loads(grafana.DASHBOARD_FILE.read_text())
    queried = grafana.queried_metrics(dashboard)
    emitted = {spec.exported for spec in metrics.METRICS}
    assert queried - emitted == set(grafana.RAY_NODE_METRICS)
    assert emitted <= queried  # nothing emitted that no panel shows
    # Ray's own node metrics by the names Ray's default dashboard queries (a renamed one fails here).
    ray_panels = pytest.importorskip("ray.dashboard.modules.metrics.dashboards.default_dashboard_panels")
    ray_text = Path(ray_panels.__file__).read_text()
    assert all(name in ray_text for name in grafana.RAY_NODE_METRICS)


def test_dashboard_has_experiment_and_stage_variables_and_every_trial_panel_filters_by_them():
    dashboard = grafana.build_dashboard()
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "experiment", "stage"}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if "ray_protopo_" in target["expr"]:
                assert 'experiment=~"$experiment", stage=~"$stage"' in target["expr"], target["expr"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_tag_set_holds_the_trial_or_stage_tags():
    for spec in metrics.METRICS:
        assert set(metrics.STAGE_TAGS) <= set(spec.tags), spec.name
        assert spec.exported == "ray_" + spec.name and spec.name.startswith("protopo_")


def test_provision_writes_where_rays_grafana_config_loads_dashboards(tmp_path):
    path = grafana.provision(tmp_path)
    assert path == tmp_path / "metrics" / "grafana" / "dashboards" / grafana.PROVISIONED_NAME
    assert json.loads(path.read_text())["uid"] == grafana.DASHBOARD_UID


def test_describe_trial_names_stage_trial_and_values():
    from protopo_ray.search.trials import describe_trial

    assert describe_trial("architecture", "ab_00001", {"model.lstm_size": 16, "train.lr": 0.0031234}) == \
        "architecture ab_00001 model.lstm_size=16 train.lr=0.00312"
    assert describe_trial("promotion", "cd_00000", {"continue": {"from_stage": "architecture", "from_trial": "ab_00001",
                                                                 "start_epoch": 3}}) == \
        "promotion cd_00000 from architecture/ab_00001 at epoch 3"
    assert describe_trial("ensemble", "ef_00002", {"val_fold": "cv2"}) == "ensemble ef_00002 member fold cv2"


@pytest.mark.ray
def test_emitting_an_epochs_metrics_costs_well_under_a_millisecond(ray_cluster):
    """Rank 0 sets ~14 gauges once per epoch (nothing per step); against a smoke epoch (~1 s here) that is nothing."""
    labels = metrics.TrialLabels(experiment="cost", stage="s", trial="t_00000")
    report = {"epoch": 1.0, "train_loss": 1.2, "val_loss": 1.1, "val_overlap_acc": 0.5, "train_residues_per_s": 9e3,
              "train_data_wait_share": 0.05, "peak_rss_bytes_max_rank": 7e8,
              **{f"val_topo_{k}": 0.5 for k in metrics.TYPE_KEYS}}
    metrics.emit_epoch(labels, report, metric="val_overlap_acc")  # the gauges are created once per process
    calls = 200
    began = time.perf_counter()
    for i in range(calls):
        metrics.emit_epoch(labels, {**report, "epoch": float(i)}, metric="val_overlap_acc")
    per_epoch_s = (time.perf_counter() - began) / calls
    print(f"\nemit_epoch: {per_epoch_s * 1e6:.0f} us per epoch report ({os.getloadavg()[0]:.1f} load)")
    assert per_epoch_s < 5e-3


def test_prometheus_flag_without_a_binary_says_what_to_install(smoke_shards, tmp_path, monkeypatch, capsys):
    from protopo_ray import tune

    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus here (and nothing else: it fails before any cluster)
    assert tune.main(["experiments/smoke.toml", "--data", str(smoke_shards), "--storage", str(tmp_path),
                      "--prometheus"]) == 2
    err = capsys.readouterr().err
    assert "--prometheus needs the `prometheus` binary on PATH" in err and "apt-get install prometheus" in err
    assert not (tmp_path / "smoke" / "stages").exists()


def test_head_runs_prometheus_and_grafana_on_the_sessions_ray_configuration(tmp_path):
    from protopo_ray.monitoring.head import monitoring_commands

    config = tmp_path / "metrics" / "prometheus" / "prometheus.yml"
    config.parent.mkdir(parents=True)
    config.write_text("scrape_configs: []\n")
    commands = monitoring_commands(tmp_path, prometheus="/usr/bin/prometheus", grafana_home=Path("/opt/grafana"))
    assert f"--config.file={config}" in commands["prometheus"]
    assert "--web.listen-address=127.0.0.1:9090" in commands["prometheus"]
    grafana_argv = commands["grafana"]
    assert grafana_argv[:2] == ["/opt/grafana/bin/grafana", "server"]
    assert grafana_argv[grafana_argv.index("--config") + 1] == str(tmp_path / "metrics" / "grafana" / "grafana.ini")
