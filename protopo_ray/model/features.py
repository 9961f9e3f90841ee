"""Cheap per-residue sequence features computed inside the model from the amino-acid index tensor.

No shard schema change: everything derives from `batch.aa` (alphabet order ACDEFGHIKLMNPQRSTVWY, 20 = unknown)
and the batch's protein boundaries (`ptr`). Each group is switched on in `ModelConfig`:

- hydropathy: Kyte-Doolittle value / 4.5 and its means over windows of 7 and 19 residues (a membrane helix
  is ~20 hydrophobic residues; the window stops at the protein's ends);
- charge: +1 for K and R, -1 for D and E, and its mean over 15 residues (the positive-inside rule);
- blosum: the residue's BLOSUM62 row / 4 (20 values), a substitution-aware encoding beside the learned embedding.

BLOSUM62 is embedded below (the 20 x 20 block of Biopython's `Bio.Align.substitution_matrices.load("BLOSUM62")`,
checked against it in tests/test_features.py when Biopython is installed), so this module needs only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protopo_ray.data.alphabet import AMINO_ACIDS, NUM_AA_TOKENS

#: Kyte & Doolittle (1982) hydropathy index.
KYTE_DOOLITTLE = {
    "A": 1.8, "C": 2.5, "D": -3.5, "E": -3.5, "F": 2.8, "G": -0.4, "H": -3.2, "I": 4.5, "K": -3.9, "L": 3.8,
    "M": 1.9, "N": -3.5, "P": -1.6, "Q": -3.5, "R": -4.5, "S": -0.8, "T": -0.7, "V": 4.2, "W": -0.9, "Y": -1.3,
}
CHARGE = {"K": 1.0, "R": 1.0, "D": -1.0, "E": -1.0}
#: BLOSUM62 rows and columns in alphabet order (AMINO_ACIDS).
BLOSUM62 = {
    "A": (4, 0, -2, -1, -2, 0, -2, -1, -1, -1, -1, -2, -1, -1, -1, 1, 0, 0, -3, -2),
    "C": (0, 9, -3, -4, -2, -3, -3, -1, -3, -1, -1, -3, -3, -3, -3, -1, -1, -1, -2, -2),
    "D": (-2, -3, 6, 2, -3, -1, -1, -3, -1, -4, -3, 1, -1, 0, -2, 0, -1, -3, -4, -3),
    "E": (-1, -4, 2, 5, -3, -2, 0, -3, 1, -3, -2, 0, -1, 2, 0, 0, -1, -2, -3, -2),
    "F": (-2, -2, -3, -3, 6, -3, -1, 0, -3, 0, 0, -3, -4, -3, -3, -2, -2, -1, 1, 3),
    "G": (0, -3, -1, -2, -3, 6, -2, -4, -2, -4, -3, 0, -2, -2, -2, 0, -2, -3, -2, -3),
    "H": (-2, -3, -1, 0, -1, -2, 8, -3, -1, -3, -2, 1, -2, 0, 0, -1, -2, -3, -2, 2),
    "I": (-1, -1, -3, -3, 0, -4, -3, 4, -3, 2, 1, -3, -3, -3, -3, -2, -1, 3, -3, -1),
    "K": (-1, -3, -1, 1, -3, -2, -1, -3, 5, -2, -1, 0, -1, 1, 2, 0, -1, -2, -3, -2),
    "L": (-1, -1, -4, -3, 0, -4, -3, 2, -2, 4, 2, -3, -3, -2, -2, -2, -1, 1, -2, -1),
    "M": (-1, -1, -3, -2, 0, -3, -2, 1, -1, 2, 5, -2, -2, 0, -1, -1, -1, 1, -1, -1),
    "N": (-2, -3, 1, 0, -3, 0, 1, -3, 0, -3, -2, 6, -2, 0, 0, 1, 0, -3, -4, -2),
    "P": (-1, -3, -1, -1, -4, -2, -2, -3, -1, -3, -2, -2, 7, -1, -2, -1, -1, -2, -4, -3),
    "Q": (-1, -3, 0, 2, -3, -2, 0, -3, 1, -2, 0, 0, -1, 5, 1, 0, -1, -2, -2, -1),
    "R": (-1, -3, -2, 0, -3, -2, 0, -3, 2, -2, -1, 0, -2, 1, 5, -1, -1, -3, -3, -2),
    "S": (1, -1, 0, 0, -2, 0, -1, -2, 0, -2, -1, 1, -1, 0, -1, 4, 1, -2, -3, -2),
    "T": (0, -1, -1, -1, -2, -2, -2, -1, -1, -1, -1, 0, -1, -1, -1, 1, 5, 0, -2, -2),
    "V": (0, -1, -3, -2, -1, -3, -3, 3, -2, 1, 1, -3, -2, -2, -3, -2, 0, 4, -3, -1),
    "W": (-3, -2, -4, -3, 1, -2, -2, -3, -3, -2, -1, -4, -4, -2, -3, -3, -2, -3, 11, 2),
    "Y": (-2, -2, -3, -2, 3, -3, 2, -1, -2, -1, -1, -2, -3, -1, -2, -2, -2, -1, 2, 7),
}
HYDROPATHY_WINDOWS = (7, 19)
CHARGE_WINDOW = 15

#: Columns each feature group adds.
FEATURE_DIMS = {"hydropathy": 1 + len(HYDROPATHY_WINDOWS), "charge": 2, "blosum": len(AMINO_ACIDS)}


def _table(values: dict[str, float], scale: float = 1.0) -> Tensor:
    """[NUM_AA_TOKENS] lookup; the unknown token gets 0."""
    table = torch.zeros(NUM_AA_TOKENS)
    for i, aa in enumerate(AMINO_ACIDS):
        table[i] = values.get(aa, 0.0) / scale
    return table


def feature_groups(hydropathy: bool, charge: bool, blosum: bool) -> tuple[str, ...]:
    return tuple(name for name, on in (("hydropathy", hydropathy), ("charge", charge), ("blosum", blosum)) if on)


def num_features(groups: tuple[str, ...]) -> int:
    return sum(FEATURE_DIMS[g] for g in groups)


def window_mean(values: Tensor, ptr: Tensor, batch_vec: Tensor, window: int) -> Tensor:
    """Mean of `values` [N] over a centred window of `window` residues, clipped at each protein's ends."""
    half = window // 2
    csum = torch.cat([values.new_zeros(1), values.cumsum(0)])
    index = torch.arange(values.numel(), device=values.device)
    lo, hi = ptr[batch_vec], ptr[batch_vec + 1]
    left = torch.maximum(index - half, lo)
    right = torch.minimum(index + half + 1, hi)
    return (csum[right] - csum[left]) / (right - left).to(values.dtype)


class SequenceFeatures(torch.nn.Module):
    """[N] amino-acid indices -> [N, num_features(groups)] features (no parameters)."""

    def __init__(self, groups: tuple[str, ...]) -> None:
        super().__init__()
        self.groups = groups
        self.register_buffer("kd", _table(KYTE_DOOLITTLE, 4.5), persistent=False)
        self.register_buffer("charge", _table(CHARGE), persistent=False)
        blosum = torch.zeros(NUM_AA_TOKENS, len(AMINO_ACIDS))
        for i, aa in enumerate(AMINO_ACIDS):
            blosum[i] = torch.tensor(BLOSUM62[aa], dtype=torch.float32) / 4.0
        self.register_buffer("blosum", blosum, persistent=False)

    @property
    def dim(self) -> int:
        return num_features(self.groups)

    def forward(self, aa: Tensor, ptr: Tensor, batch_vec: Tensor) -> Tensor:
        columns: list[Tensor] = []
        if "hydropathy" in self.groups:
            kd = self.kd[aa]
            columns += [kd] + [window_mean(kd, ptr, batch_vec, w) for w in HYDROPATHY_WINDOWS]
        if "charge" in self.groups:
            charge = self.charge[aa]
            columns += [charge, window_mean(charge, ptr, batch_vec, CHARGE_WINDOW)]
        out = torch.stack(columns, dim=-1) if columns else self.kd.new_zeros(aa.numel(), 0)
        if "blosum" in self.groups:
            out = torch.cat([out, self.blosum[aa]], dim=-1)
        return out
