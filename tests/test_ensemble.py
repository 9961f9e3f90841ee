"""load_predictor: a checkpoint dir or an ensemble dir; the ensemble averages posteriors and decodes by grammar."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch_geometric.data import Batch, Data

from protopo_ray.config import Config, ModelConfig
from protopo_ray.data.alphabet import LABELS
from protopo_ray.model.ensemble import Ensemble, load_predictor, write_ensemble
from protopo_ray.model.grammar import default_grammar
from protopo_ray.model.network import TopologyModel
from protopo_ray.training.checkpoint import TrainState, save_checkpoint

SMALL = ModelConfig(gc_size=8, gc_layers=1, lstm_size=8, lstm_layers=1, aa_embed_dim=4)


def protein(length: int, seed: int) -> Data:
    """A chain with edges to its sequence neighbours (the sequence-window graph's shape, window 1)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.cat([torch.arange(length - 1), torch.arange(1, length)])
    dst = torch.cat([torch.arange(1, length), torch.arange(length - 1)])
    return Data(aa=torch.randint(0, 21, (length,), generator=g), x=torch.rand(length, 8, generator=g),
                edge_index=torch.stack([src, dst]), edge_attr=torch.zeros(src.numel(), 3),
                y=torch.zeros(length, dtype=torch.long), num_nodes=length)


def checkpoint(tmp_path, name, model_cfg, seed):
    torch.manual_seed(seed)
    config = dataclasses.replace(Config(), model=model_cfg)
    model = TopologyModel(model_cfg)
    state = TrainState(model=model.state_dict(), optimizer=None, epoch=1, config=config.to_dict())
    return save_checkpoint(tmp_path / name, state), model


def test_checkpoint_dir_gives_the_model_itself(tmp_path):
    path, model = checkpoint(tmp_path, "a", SMALL, 0)
    predictor, config = load_predictor(path)
    assert isinstance(predictor, TopologyModel) and config.model == SMALL
    batch = Batch.from_data_list([protein(12, 0)])
    assert torch.equal(predictor(batch), model.eval()(batch))


def test_ensemble_averages_posteriors_and_decodes_grammatically(tmp_path):
    a, model_a = checkpoint(tmp_path, "a", SMALL, 0)
    b, model_b = checkpoint(tmp_path, "b", dataclasses.replace(SMALL, decoder="crf", feature_hydropathy=True), 1)
    write_ensemble(tmp_path / "ens", [a, b], entry_penalty=1.5)
    predictor, config = load_predictor(tmp_path / "ens")
    assert isinstance(predictor, Ensemble) and len(predictor.members) == 2 and predictor.entry_penalty == 1.5
    batch = Batch.from_data_list([protein(30, 0), protein(17, 1)])
    log_p = predictor(batch)
    expected = (model_a.eval()(batch).softmax(-1) + model_b.eval().label_posteriors(batch, model_b(batch))) / 2
    assert torch.allclose(log_p.exp(), expected, atol=1e-5)
    decoded = predictor.decode(batch, log_p)
    for lo, hi in ((0, 30), (30, 47)):
        assert default_grammar().accepts("".join(LABELS[i] for i in decoded[lo:hi].tolist()))


def test_neither_checkpoint_nor_ensemble_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_predictor(tmp_path)
