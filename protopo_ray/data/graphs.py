"""Residue graphs: k nearest C-alpha neighbours where a structure exists, a sequence window where not.

Pure numpy/scipy; no Ray, no torch. Edges point from a neighbour (row 0, source) to the residue whose
neighbourhood it belongs to (row 1, target), so a message-passing layer that aggregates incoming edges sees
exactly the residue's neighbours. Edges are sorted by (target, source), which makes graphs deterministic and
comparable across runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from protopo_ray.data.alphabet import encode_sequence

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

GRAPH_SOURCES = ("structure", "sequence")

# Residues further than this from a chain end all look the same to the terminus features.
_TERMINUS_CAP = 100
# Sequence separations are log-scaled so that 1000 residues apart maps to 1.
SEPARATION_SCALE = float(np.log1p(1000.0))
_DISTANCE_SCALE_A = 10.0


@dataclass(slots=True)
class ResidueGraph:
    """One protein's residue graph (numpy arrays; `shards` turns them into Arrow columns and tensors)."""

    aa: np.ndarray
    """int8 [L]: amino-acid indices (alphabet.encode_sequence)."""
    node_features: np.ndarray
    """float32 [L, len(NODE_FEATURES)]."""
    edge_index: np.ndarray
    """int32 [2, E]: row 0 source (the neighbour), row 1 target; sorted by (target, source)."""
    edge_distance: np.ndarray
    """float32 [E]: C-alpha distance in Angstrom; NaN for edges without one (sequence links)."""
    graph_source: str
    """'structure' (k nearest C-alpha neighbours) or 'sequence' (sequence window)."""
    ca: np.ndarray | None = None
    """float32 [L, 3] C-alpha coordinates the graph was built from (NaN rows = missing); None for 'sequence'."""

    @property
    def num_nodes(self) -> int:
        return int(self.aa.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


def build_graph(sequence: str, ca: np.ndarray | None = None, k: int = DEFAULT_K) -> ResidueGraph:
    """Residue graph of `sequence`: k nearest C-alpha neighbours when `ca` ([L, 3], NaN rows = missing
    residues) has any coordinates, else a sequence window of k//2 residues on each side.

    In a structure graph, residues without coordinates are linked (both ways, no distance) to their +-1
    sequence neighbours so that they still exchange messages along the chain. A `ca` without a single
    finite row carries no geometry and gives the sequence graph.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    length = len(sequence)
    aa = np.asarray(encode_sequence(sequence), dtype=np.int8)
    if ca is not None:
        ca = np.asarray(ca, dtype=np.float32)
        if ca.shape != (length, 3):
            raise ValueError(f"ca has shape {ca.shape}, expected ({length}, 3) for a sequence of length {length}")
        if not np.isfinite(ca).all(axis=1).any():
            ca = None
    if ca is None:
        src, dst = _sequence_window(length, k)
        distance = np.full(src.shape[0], np.nan, dtype=np.float32)
        source = "sequence"
    else:
        src, dst, distance = _nearest_neighbours(ca, k)
        source = "structure"
    order = np.lexsort((src, dst))
    edge_index = np.stack([src[order], dst[order]]).astype(np.int32)
    return ResidueGraph(
        aa=aa,
        node_features=node_features(length, ca),
        edge_index=edge_index,
        edge_distance=distance[order].astype(np.float32),
        graph_source=source,
        ca=ca,
    )


def _sequence_window(length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    half = k // 2
    offsets = np.concatenate([np.arange(-half, 0), np.arange(1, half + 1)])
    dst = np.repeat(np.arange(length, dtype=np.int64), offsets.size)
    src = dst + np.tile(offsets, length)
    keep = (src >= 0) & (src < length)
    return src[keep], dst[keep]


def _nearest_neighbours(ca: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    length = ca.shape[0]
    present = np.flatnonzero(np.isfinite(ca).all(axis=1))
    num_neighbours = min(k, present.size - 1)
    srcs, dsts, dists = [], [], []
    if num_neighbours > 0:
        # Ask for one extra to drop the point itself. With duplicate coordinates the tree may return a twin
        # before the point; then the point is missing from its row and the furthest hit is dropped instead.
        dist, idx = cKDTree(ca[present]).query(ca[present], k=num_neighbours + 1)
        keep = idx != np.arange(present.size)[:, None]
        no_self = keep.all(axis=1)
        keep[no_self, -1] = False
        srcs.append(present[idx[keep]])
        dsts.append(np.repeat(present, num_neighbours))
        dists.append(dist[keep])
    missing = np.ones(length, dtype=bool)
    missing[present] = False
    if missing.any():
        # Chain links around residues without coordinates: (m-1 <-> m) and (m <-> m+1), both directions.
        m = np.flatnonzero(missing)
        left = np.stack([m - 1, m])[:, m > 0]
        right = np.stack([m, m + 1])[:, m < length - 1]
        pairs = np.concatenate([left, right], axis=1)
        pairs = np.unique(np.concatenate([pairs, pairs[::-1]], axis=1), axis=1)
        srcs.append(pairs[0])
        dsts.append(pairs[1])
        dists.append(np.full(pairs.shape[1], np.nan))
    if not srcs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    return (np.concatenate(srcs).astype(np.int64), np.concatenate(dsts).astype(np.int64),
            np.concatenate(dists).astype(np.float32))


def node_features(length: int, ca: np.ndarray | None = None) -> np.ndarray:
    """float32 [L, len(NODE_FEATURES)]: position, termini, structure flag and C-alpha virtual angles."""
    features = np.zeros((length, len(NODE_FEATURES)), dtype=np.float32)
    i = np.arange(length, dtype=np.float64)
    features[:, 0] = i / (length - 1) if length > 1 else 0.0
    features[:, 1] = np.minimum(i, _TERMINUS_CAP) / _TERMINUS_CAP
    features[:, 2] = np.minimum(length - 1 - i, _TERMINUS_CAP) / _TERMINUS_CAP
    if ca is None or length == 0:
        return features
    ca = np.asarray(ca, dtype=np.float64)
    present = np.isfinite(ca).all(axis=1)
    features[:, 3] = present
    if length >= 3:
        cos, sin = _bond_angles(ca)
        features[1:-1, 4] = cos
        features[1:-1, 5] = sin
    if length >= 4:
        cos, sin = _dihedrals(ca)
        features[1:-2, 6] = cos
        features[1:-2, 7] = sin
    return features


def _bond_angles(ca: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of the angle at CA(i) between CA(i-1) and CA(i+1), for i = 1..L-2; 0 where undefined."""
    a = ca[:-2] - ca[1:-1]
    b = ca[2:] - ca[1:-1]
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = np.isfinite(norm) & (norm > 0)  # NaN (missing residue) or coincident points: undefined
    safe = np.where(ok, norm, 1.0)
    cos = np.where(ok, np.einsum("ij,ij->i", np.nan_to_num(a), np.nan_to_num(b)) / safe, 0.0)
    sin = np.where(ok, np.linalg.norm(np.cross(np.nan_to_num(a), np.nan_to_num(b)), axis=1) / safe, 0.0)
    return cos, sin


def _dihedrals(ca: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of the dihedral CA(i-1)-CA(i)-CA(i+1)-CA(i+2) for i = 1..L-3 (IUPAC sign: a right-handed
    alpha helix is about +50 degrees); 0 where undefined (missing residue, collinear points)."""
    present = np.isfinite(ca).all(axis=1)
    four = present[:-3] & present[1:-2] & present[2:-1] & present[3:]
    ca = np.nan_to_num(ca)  # missing rows are masked by `four`; NaN-free maths avoids warnings
    b0, b1, b2 = ca[1:-2] - ca[:-3], ca[2:-1] - ca[1:-2], ca[3:] - ca[2:-1]
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    x = np.einsum("ij,ij->i", n1, n2)
    y = np.linalg.norm(b1, axis=1) * np.einsum("ij,ij->i", b0, n2)
    r = np.hypot(x, y)
    ok = four & (r > 1e-12)
    safe = np.where(ok, r, 1.0)
    return np.where(ok, x / safe, 0.0), np.where(ok, y / safe, 0.0)


def edge_features(edge_index: np.ndarray, edge_distance: np.ndarray | None) -> np.ndarray:
    """float32 [E, len(EDGE_FEATURES)] from edges and their C-alpha distances (NaN or None = no distance).

    The one definition used both when building graphs and when reading shards (shards store only src, dst
    and distance). Separations only need src - dst, so per-protein or batch-global node ids give the same.
    """
    edge_index = np.asarray(edge_index)
    num_edges = edge_index.shape[1]
    features = np.zeros((num_edges, len(EDGE_FEATURES)), dtype=np.float32)
    if edge_distance is not None:
        distance = np.asarray(edge_distance, dtype=np.float32)
        if distance.shape != (num_edges,):
            raise ValueError(f"edge_distance has shape {distance.shape}, expected ({num_edges},)")
        has = np.isfinite(distance)
        features[:, 0] = np.where(has, distance, 0.0) / _DISTANCE_SCALE_A
        features[:, 2] = has
    separation = edge_index[1].astype(np.int64) - edge_index[0].astype(np.int64)
    features[:, 1] = np.sign(separation) * np.log1p(np.abs(separation)) / SEPARATION_SCALE
    return features
