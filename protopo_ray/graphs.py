"""Residue graphs: k nearest C-alpha neighbours where a structure exists, a sequence window where not.

Pure numpy/scipy; no Ray, no torch.
"""

from __future__ import annotations

#: Per-residue scalar features, in column order (the amino-acid identity travels separately as `aa`).
NODE_FEATURES = (
    "rel_position",  # i / (L - 1)
    "n_term_distance",  # min(i, 100) / 100
    "c_term_distance",  # min(L - 1 - i, 100) / 100
    "has_structure",  # 1 where this residue has C-alpha coordinates
    "bond_angle_cos",  # virtual bond angle CA(i-1)-CA(i)-CA(i+1); 0 where undefined
    "bond_angle_sin",
    "dihedral_cos",  # virtual dihedral CA(i-1)-CA(i)-CA(i+1)-CA(i+2); 0 where undefined
    "dihedral_sin",
)

#: Per-edge features, in column order; derived from (src, dst, distance) by `edge_features`.
EDGE_FEATURES = (
    "ca_distance",  # C-alpha distance / 10 Angstrom; 0 for sequence-window edges
    "seq_separation",  # sign(dst - src) * log1p(|dst - src|) / log1p(1000)
    "has_distance",  # 1 for structure edges, 0 for sequence-window edges
)

DEFAULT_K = 16
