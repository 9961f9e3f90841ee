"""Sequence features: hand-computed values, window means clipped at protein ends, BLOSUM62 as Biopython has it."""

from __future__ import annotations

import pytest
import torch

from protopo_ray.data.alphabet import AMINO_ACIDS, encode_sequence
from protopo_ray.model.features import BLOSUM62, SequenceFeatures, feature_groups, num_features, window_mean


def test_window_mean_stops_at_protein_ends():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    ptr = torch.tensor([0, 3, 5])
    batch_vec = torch.tensor([0, 0, 0, 1, 1])
    out = window_mean(values, ptr, batch_vec, 3)
    assert torch.allclose(out, torch.tensor([1.5, 2.0, 2.5, 15.0, 15.0]))


def test_features_of_a_hand_built_protein():
    groups = feature_groups(hydropathy=True, charge=True, blosum=True)
    assert num_features(groups) == 3 + 2 + 20
    aa = torch.tensor(encode_sequence("IKD"))
    out = SequenceFeatures(groups)(aa, torch.tensor([0, 3]), torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 25)
    assert out[:, 0].tolist() == pytest.approx([1.0, -3.9 / 4.5, -3.5 / 4.5])
    assert out[1, 1].item() == pytest.approx((4.5 - 3.9 - 3.5) / 3 / 4.5)  # window 7 covers the whole protein
    assert out[:, 3].tolist() == [0.0, 1.0, -1.0]  # charge
    assert out[0, 5 + AMINO_ACIDS.index("I")].item() == pytest.approx(1.0)  # BLOSUM62 I/I = 4, / 4
    assert SequenceFeatures(()).dim == 0


def test_embedded_blosum62_is_biopythons():
    substitution_matrices = pytest.importorskip("Bio.Align.substitution_matrices")
    matrix = substitution_matrices.load("BLOSUM62")
    for a in AMINO_ACIDS:
        assert BLOSUM62[a] == tuple(int(matrix[a][b]) for b in AMINO_ACIDS)
