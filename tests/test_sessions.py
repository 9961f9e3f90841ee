"""The Ray sessions: a reused trial process reads each split once (and again when the shards change); a trial
resumes from its own newer best/, never from a seeded one; a worker given GPUs refuses a torch without CUDA."""

from __future__ import annotations

import json
import shutil

import pytest

from protopo_ray.config import Config


@pytest.mark.ray
def test_tune_session_reads_a_split_once_per_process_until_the_shards_change(ray_cluster, smoke_shards, tmp_path,
                                                                            monkeypatch):
    from protopo_ray.cluster import sessions
    from protopo_ray.data import shards

    reads = []
    read_table = shards.read_table
    monkeypatch.setattr(sessions.shards, "read_table", lambda *a, **k: reads.append(k["folds"]) or read_table(*a, **k))
    data = tmp_path / "shards"
    shutil.copytree(smoke_shards, data)
    config = Config().replace({"data.path": str(data), "data.train_folds": ["train"], "data.val_folds": ["val"],
                               "data.max_proteins": 20, "resources.storage": str(tmp_path / "runs")})
    monkeypatch.setattr(sessions, "TABLES", sessions.TableCache())  # a fresh process's cache
    first = sessions.TuneSession(config).split("train")
    again = sessions.TuneSession(config.replace({"name": "next_trial"})).split("train")
    # The next trial in the process reads nothing: the same 20 proteins.
    assert reads == [["train"]] and again.table.equals(first.table) and first.num_proteins == 20
    sessions.TuneSession(config).split("val")
    assert reads == [["train"], ["val"]]
    manifest = data / "manifest.json"  # shards rewritten (prepare writes a new manifest): read again
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "rewritten": True}))
    sessions.TuneSession(config).split("train")
    assert reads == [["train"], ["val"], ["train"]] and sessions.TABLES.reads == 3


@pytest.mark.ray
def test_tune_session_resumes_from_its_own_newer_best_not_from_a_seeded_one(ray_cluster, tmp_path, monkeypatch,
                                                                           write_checkpoint):
    """A driver killed between a trial's report and Tune's snapshot: Tune hands back an older checkpoint (here
    none), but the run's best/ is complete and newer. A promotion's best/, seeded from its source run, is not its
    own and never counts."""
    import ray.tune

    from protopo_ray.cluster import sessions
    from protopo_ray.training.checkpoint import copy_checkpoint

    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    config = Config().replace({"resources.storage": str(tmp_path / "runs"), "name": "trial_a", "model.gc_size": 4,
                               "model.lstm_size": 4, "model.aa_embed_dim": 4})

    def best_of(run_config, epoch):
        source = write_checkpoint(tmp_path / f"src_{epoch}", run_config, epoch=epoch, metrics={"val_loss": 0.5},
                                  best_value=0.5)
        copy_checkpoint(source, str(tmp_path / "runs"), "trial_a/best")

    assert sessions.TuneSession(config).resume_state() is None
    best_of(config.replace({"name": "source_trial"}), 6)  # seeded by a continuation from another run
    assert sessions.TuneSession(config).resume_state() is None
    best_of(config, 2)  # the run's own
    assert sessions.TuneSession(config).resume_state().epoch == 2


def test_worker_given_gpus_refuses_a_torch_without_cuda():
    from protopo_ray.cluster.sessions import NoCudaError, require_cuda

    config = Config().replace({"name": "arch_0001"})
    with pytest.raises(NoCudaError, match=r"arch_0001 GPU\(s\) 0 on node n1.*sees no CUDA.*train.device = 'cpu'"):
        require_cuda(config, ["0"], cuda_available=False, node="n1")
    with pytest.raises(NoCudaError):  # asking for cuda explicitly is no way around it either
        require_cuda(config.replace({"train.device": "cuda"}), ["0"], cuda_available=False)


@pytest.mark.parametrize("device, gpu_ids, cuda", [
    ("cpu", ["0"], False),  # logical GPUs, CPU compute on purpose (fake autoscaler, tests)
    ("auto", [], False),  # a CPU trial
    ("auto", ["0", "1"], True),  # a real GPU worker
])
def test_cpu_compute_only_where_asked_or_where_no_gpu_was_given(device, gpu_ids, cuda):
    from protopo_ray.cluster.sessions import require_cuda

    require_cuda(Config().replace({"train.device": device}), gpu_ids, cuda_available=cuda)
