"""Residue graphs on hand-built geometries with hand-computed neighbours, angles and features."""

from __future__ import annotations

import numpy as np
import pytest

from protopo_ray.data.graphs import EDGE_FEATURES, NODE_FEATURES, build_graph, edge_features, node_features

# Five residues on the x axis at 0, 1, 3, 6, 10 Angstrom: gaps 1, 2, 3, 4, so every k=2 neighbourhood is unique.
LINE = np.array([[0, 0, 0], [1, 0, 0], [3, 0, 0], [6, 0, 0], [10, 0, 0]], dtype=np.float32)


def edge_set(graph):
    return {(int(s), int(d)): float(x) for s, d, x in zip(*graph.edge_index, graph.edge_distance)}


def test_knn_on_a_line_k2():
    graph = build_graph("ACDEF", LINE, k=2)
    # target 0: 1 (1 A), 2 (3 A); 1: 0 (1), 2 (2); 2: 1 (2), 0 (3); 3: 2 (3), 4 (4); 4: 3 (4), 2 (7)
    expected = {(1, 0): 1, (2, 0): 3, (0, 1): 1, (2, 1): 2, (1, 2): 2, (0, 2): 3,
                (2, 3): 3, (4, 3): 4, (3, 4): 4, (2, 4): 7}
    assert edge_set(graph) == pytest.approx(expected)
    assert graph.graph_source == "structure"
    assert graph.edge_index.dtype == np.int32 and graph.edge_distance.dtype == np.float32
    assert graph.aa.dtype == np.int8 and graph.aa.tolist() == [0, 1, 2, 3, 4]
    assert graph.node_features.shape == (5, len(NODE_FEATURES)) and graph.node_features.dtype == np.float32
    # Sorted by target, then source: deterministic order.
    assert graph.edge_index.tolist() == [[1, 2, 0, 2, 0, 1, 2, 4, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]


def test_k_larger_than_length_gives_all_other_residues():
    graph = build_graph("ACDEF", LINE, k=16)
    assert graph.edge_index.shape == (2, 20)
    assert set(edge_set(graph)) == {(s, d) for s in range(5) for d in range(5) if s != d}


def test_single_residue_structure_has_no_edges():
    graph = build_graph("A", np.zeros((1, 3)), k=16)
    assert graph.edge_index.shape == (2, 0) and graph.num_nodes == 1


def test_duplicate_coordinates_never_give_self_edges():
    graph = build_graph("AAAA", np.zeros((4, 3)), k=2)
    src, dst = graph.edge_index
    assert (src != dst).all() and np.bincount(dst).tolist() == [2, 2, 2, 2]


def test_sequence_window_clipped_at_chain_ends():
    graph = build_graph("ACDEFG", k=4)  # two neighbours each side
    assert graph.graph_source == "sequence" and graph.ca is None
    assert np.isnan(graph.edge_distance).all()
    neighbours = {d: sorted(int(s) for s in graph.edge_index[0][graph.edge_index[1] == d]) for d in range(6)}
    assert neighbours == {0: [1, 2], 1: [0, 2, 3], 2: [0, 1, 3, 4], 3: [1, 2, 4, 5], 4: [2, 3, 5], 5: [3, 4]}
    assert graph.node_features[:, 3:].sum() == 0  # no structure: flag and angles zero


def test_missing_residues_linked_to_chain_neighbours_without_distance():
    ca = LINE.copy()
    ca[2] = np.nan
    graph = build_graph("ACDEF", ca, k=2)
    edges = edge_set(graph)
    for pair in [(1, 2), (2, 1), (3, 2), (2, 3)]:
        assert np.isnan(edges.pop(pair))
    # The remaining residues 0, 1, 3, 4 at x = 0, 1, 6, 10 use only each other.
    assert edges == pytest.approx({(1, 0): 1, (3, 0): 6, (0, 1): 1, (3, 1): 5, (1, 3): 5, (4, 3): 4,
                                   (3, 4): 4, (1, 4): 9})
    assert graph.node_features[:, 3].tolist() == [1, 1, 0, 1, 1]


def test_structure_without_coordinates_falls_back_to_sequence():
    graph = build_graph("ACDEF", np.full((5, 3), np.nan), k=2)
    assert graph.graph_source == "sequence" and graph.ca is None


def test_bad_ca_shape_is_rejected():
    with pytest.raises(ValueError, match="expected \\(5, 3\\)"):
        build_graph("ACDEF", np.zeros((4, 3)))


def test_position_features():
    features = node_features(3)
    assert features[:, 0].tolist() == [0, 0.5, 1]
    assert features[:, 1].tolist() == pytest.approx([0, 0.01, 0.02])
    assert features[:, 2].tolist() == pytest.approx([0.02, 0.01, 0])
    assert node_features(1)[0, 0] == 0  # single residue: no division by zero
    assert node_features(300)[150, 1] == 1 and node_features(300)[150, 2] == 1  # capped at 100 residues


def test_right_angle_and_dihedrals():
    # 0 -> 1 along x, 1 -> 2 along y, 2 -> 3 along z: right angles at 1 and 2, dihedral -90 degrees at 1.
    ca = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=np.float32)
    f = node_features(4, ca)
    assert f[:, 4] == pytest.approx([0, 0, 0, 0], abs=1e-6)  # cos 90 deg; ends undefined -> 0
    assert f[:, 5] == pytest.approx([0, 1, 1, 0], abs=1e-6)
    assert f[1, 6:].tolist() == pytest.approx([0, -1], abs=1e-6)
    assert f[[0, 2, 3], 6:].sum() == 0
    trans = node_features(4, np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [-1, 1, 0]], dtype=np.float32))
    cis = node_features(4, np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32))
    assert trans[1, 6:].tolist() == pytest.approx([-1, 0], abs=1e-6)
    assert cis[1, 6:].tolist() == pytest.approx([1, 0], abs=1e-6)


def test_right_handed_helix_has_positive_dihedral():
    i = np.arange(8)
    angle = np.deg2rad(100 * i)
    ca = np.stack([2.3 * np.cos(angle), 2.3 * np.sin(angle), 1.5 * i], axis=1)
    f = node_features(8, ca)
    assert np.degrees(np.arctan2(f[1:5, 7], f[1:5, 6])) == pytest.approx(50.0, abs=1.0)


def test_collinear_points_and_missing_residues_leave_angles_zero():
    f = node_features(5, LINE)
    assert f[1:4, 4].tolist() == pytest.approx([-1, -1, -1])  # straight line: 180 degrees
    assert f[:, 6:].sum() == 0  # dihedral undefined on a line
    ca = LINE.copy()
    ca[:, 1] = [0, 1, 0, 1, 0]  # zig-zag in a plane
    ca[2] = np.nan
    f = node_features(5, ca)
    assert f[1:4, 4:].sum() == 0  # every angle touching residue 2 is undefined
    assert not np.isnan(f).any()


def test_edge_features():
    edge_index = np.array([[1, 0, 0], [0, 1, 1000]])
    f = edge_features(edge_index, np.array([5.0, np.nan, 12.5], dtype=np.float32))
    assert f.shape == (3, len(EDGE_FEATURES)) and f.dtype == np.float32
    assert f[:, 0].tolist() == pytest.approx([0.5, 0, 1.25])
    assert f[:, 1].tolist() == pytest.approx([-np.log1p(1) / np.log1p(1000), np.log1p(1) / np.log1p(1000), 1])
    assert f[:, 2].tolist() == [1, 0, 1]
    assert edge_features(edge_index, None)[:, [0, 2]].sum() == 0
