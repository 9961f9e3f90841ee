"""Run config: defaults, TOML loading, --set overrides, and errors that name the key."""

from __future__ import annotations

import math

import pytest

from protopo_ray.config import Config, ExperimentSettings, Objective, load_config, parse_overrides, parse_value


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_and_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, 'name = "x"\n[model]\nlstm_size = 64\n[data]\ntrain_folds = ["cv0", "cv3"]\n')
    config = load_config(path, parse_overrides(["model.lstm_size=512", "train.lr=0.01", "model.bidirectional=false"]))
    assert config.name == "x"
    assert config.model.lstm_size == 512 and config.model.bidirectional is False
    assert config.train.lr == 0.01
    assert config.data.train_folds == ("cv0", "cv3")


def test_round_trip_through_dict():
    config = Config().replace({"data.type_weights": {"TM": 2.0}, "train.label_weights": {"M": 1.5}})
    assert Config.from_dict(config.to_dict()) == config


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "[model]\nlstm_sise = 64\n")
    with pytest.raises(ValueError, match=r"run.toml.model: unknown key\(s\) \['lstm_sise'\]"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        load_config(write(tmp_path, "[modle]\nx = 1\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-0.1", "train.lr must be a positive number"),
        ("model.dropout=1.5", "model.dropout must be in"),
        ("model.gc_operator='gat'", "model.gc_operator must be one of"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("train.schedule='step'", "train.schedule must be one of"),
        ("model.lstm_size='big'", "expected an integer"),
        ("data.type_weights={ALIEN=2.0}", "unknown type 'ALIEN'"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, parse_overrides([override]))


def test_fractional_gpu_only_with_one_worker():
    load_config(None, {"resources.gpus_per_worker": 0.25, "resources.num_workers": 1})
    with pytest.raises(ValueError, match="GPU fraction"):
        load_config(None, {"resources.gpus_per_worker": 0.5, "resources.num_workers": 2})


def test_parse_value_types():
    assert parse_value("3") == 3 and parse_value("3e-4") == 3e-4 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("gcn") == "gcn" and parse_value("'gcn'") == "gcn"


def test_malformed_set_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="expected section.key=value"):
        parse_overrides(["model.lstm_size"])
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_experiment_settings_read_the_experiment_table(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("name = 'x'\n[experiment]\nsynthetic = 60\nseed = 4\n[data]\npath = 'data/x'\n")
    assert ExperimentSettings.of_file(path) == ExperimentSettings(synthetic=60, seed=4)
    assert ExperimentSettings.of_file(None) == ExperimentSettings()
    path.write_text("[data]\npath = 'data/x'\n")
    assert ExperimentSettings.of_file(path) == ExperimentSettings()
    path.write_text("[experiment]\nsynthetic = 'many'\n")
    with pytest.raises(ValueError, match="exp.toml: \\[experiment\\] synthetic must be an integer >= 0"):
        ExperimentSettings.of_file(path)


def test_a_run_reads_an_experiment_file_and_ignores_its_search_tables(tmp_path):
    path = write(tmp_path, 'name = "x"\n[experiment]\nsynthetic = 60\n[prices]\ncpu_hour = 0.1\n'
                           '[[stages]]\nname = "s"\n[model]\nlstm_size = 8\n')
    assert load_config(path).model.lstm_size == 8


def test_with_absolute_paths_resolves_local_paths_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config().replace({"data.path": "data/x", "resources.storage": "s3://bucket/runs"}).with_absolute_paths()
    assert config.data.path == str(tmp_path / "data" / "x") and config.resources.storage == "s3://bucket/runs"


def test_objective_ranks_non_finite_last_and_keeps_ties_in_order():
    rows = [{"m": 0.5, "id": "a"}, {"m": math.nan, "id": "b"}, {"m": 0.9, "id": "c"}, {"id": "d"},
            {"m": 0.5, "id": "e"}]
    assert [r["id"] for r in Objective("m", "max").ranked(rows)] == ["c", "a", "e", "b", "d"]
    assert [r["id"] for r in Objective("m", "min").ranked(rows)] == ["a", "e", "c", "b", "d"]
    assert Objective("m", "min").best(rows)["id"] == "a" and Objective("m").best([{"m": math.nan}]) is None
    assert Objective("m").better(0.1, None) and not Objective("m").better(math.nan, 0.1)
    assert not Objective("m", "min").better(0.3, 0.2) and Objective("m", "min").worst == math.inf
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        Objective("m", "up")
