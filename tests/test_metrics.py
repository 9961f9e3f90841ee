"""Protein-level metrics on hand-worked label strings (positions are 0-based, segment ends exclusive)."""

from __future__ import annotations

import math
import pickle

import pytest

from protopo_ray.model.metrics import (
    METRIC_KEYS,
    TYPE_KEYS,
    ProteinResult,
    aggregate,
    format_metrics,
    protein_metrics,
    protein_result,
    protein_type,
    segments,
    topology_match,
)

# I 0-5, M 5-11, O 11-15: one 6-residue helix.
TM_ONE = "IIIIIMMMMMMOOOO"
# I 0-3, M 3-9, O 9-12, M 12-18, I 18-20: two helices.
TM_TWO = "IIIMMMMMMOOOMMMMMMII"
TM_TWO_MISSING = "IIIMMMMMMOOOOOOOOOOO"


def _absent(metrics: dict, *suffixes: str) -> bool:
    return all(math.isnan(metrics[f"{kind}_{s}"]) for s in suffixes for kind in ("topo", "type"))


@pytest.mark.parametrize(
    "labels, expected",
    [
        ("IIMMMOO", "TM"),
        ("SSSIIMMMOO", "SP+TM"),
        ("SSSOOOO", "SP"),
        ("IIII", "GLOBULAR"),
        ("IIBBBOOSSMM", "BETA"),
        ("OOOO", "INVALID"),
        ("PPPP", "INVALID"),
        ("IIOO", "INVALID"),
        ("", "INVALID"),
    ],
)
def test_protein_type(labels, expected):
    assert protein_type(labels) == expected


def test_segments_are_maximal_runs_end_exclusive():
    assert segments("IIMMMO") == [("I", 0, 2), ("M", 2, 5), ("O", 5, 6)]
    assert segments("") == []


def test_metric_keys_order():
    assert METRIC_KEYS == (
        "topo_tm", "topo_sptm", "topo_sp", "topo_glob", "topo_beta",
        "type_tm", "type_sptm", "type_sp", "type_glob", "type_beta",
        "type_acc", "overlap_acc", "residue_acc", "topo_mean",
    )  # fmt: skip
    assert list(TYPE_KEYS) == ["TM", "SP+TM", "SP", "GLOBULAR", "BETA"]


def test_perfect_prediction():
    m = protein_metrics([TM_ONE, TM_TWO, "SSSSSSOOOO", "IIII"], [TM_ONE, TM_TWO, "SSSSSSOOOO", "IIII"])
    assert m["topo_tm"] == m["type_tm"] == m["topo_sp"] == m["topo_glob"] == 1.0
    assert m["type_acc"] == m["overlap_acc"] == m["residue_acc"] == m["topo_mean"] == 1.0
    assert (m["n_tm"], m["n_sp"], m["n_glob"], m["n_proteins"], m["n_residues"]) == (2, 1, 1, 4, 49)
    assert _absent(m, "sptm", "beta")


def test_one_residue_off_within_tolerance():
    pred = "IIIIIIMMMMMMOOO"  # helix 6-12 vs true 5-11: overlap 5
    assert topology_match(TM_ONE, pred)
    m = protein_metrics([TM_ONE], [pred])
    assert m["topo_tm"] == 1.0
    assert m["residue_acc"] == pytest.approx(13 / 15)


def test_helix_overlap_four_fails_five_passes():
    assert topology_match(TM_ONE, "IIIIIIMMMMMMOOO")  # 6-12: overlap 11 - 6 = 5
    assert not topology_match(TM_ONE, "IIIIIIIMMMMMMOO")  # 7-13: overlap 11 - 7 = 4
    m = protein_metrics([TM_ONE], ["IIIIIIIMMMMMMOO"])
    assert (m["type_tm"], m["topo_tm"], m["overlap_acc"]) == (1.0, 0.0, 0.0)


def test_signal_peptide_overlap_needs_five():
    true = "SSSSSSIIMMMMMMOO"  # SP+TM, S 0-6
    assert topology_match(true, "SSSSSIIIMMMMMMOO")  # S 0-5: overlap 5
    assert not topology_match(true, "SSSSIIIIMMMMMMOO")  # S 0-4: overlap 4


def test_beta_overlap_two_fails_three_passes():
    true = "IIIBBBBOOO"  # B 3-7
    assert topology_match(true, "IIIIBBBBOO")  # B 4-8: overlap 3
    assert not topology_match(true, "IIIIIBBBBO")  # B 5-9: overlap 2
    m = protein_metrics([true, true], ["IIIIBBBBOO", "IIIIIBBBBO"])
    assert (m["type_beta"], m["topo_beta"]) == (1.0, 0.5)


def test_outside_and_periplasm_interchangeable():
    true = "IIIIIMMMMMMPPPP"
    pred = "IIIIIMMMMMMOOOO"
    assert topology_match(true, pred)
    m = protein_metrics([true], [pred])
    assert (m["topo_tm"], m["overlap_acc"]) == (1.0, 1.0)
    assert m["residue_acc"] == pytest.approx(11 / 15)  # the swap still costs residues


def test_inside_is_not_outside():
    assert not topology_match("IIIIIMMMMMMOOOO", "OOOOOMMMMMMIIII")


def test_missing_segment():
    assert not topology_match(TM_TWO, TM_TWO_MISSING)
    m = protein_metrics([TM_TWO], [TM_TWO_MISSING])
    assert (m["type_tm"], m["topo_tm"]) == (1.0, 0.0)


def test_extra_segment():
    assert not topology_match(TM_TWO_MISSING, TM_TWO)
    m = protein_metrics([TM_TWO_MISSING], [TM_TWO])
    assert (m["type_tm"], m["topo_tm"], m["overlap_acc"]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("pred", ["OOOO", "IIOO", "PPPP"])
def test_invalid_prediction_never_correct(pred):
    r = protein_result("IIII", pred)
    assert r.pred_type == "INVALID" and not r.match
    m = protein_metrics(["IIII"], [pred])
    assert (m["type_glob"], m["topo_glob"], m["overlap_acc"], m["type_acc"]) == (0.0, 0.0, 0.0, 0.0)


def test_signal_peptide_and_globular_need_only_the_type():
    true = "SSSSSSOOOOOOOOO"
    pred = "SSOOOOOOOOOOOOO"  # S 0-2 vs 0-6: overlap 2, no topology match, but type SP
    assert not topology_match(true, pred)
    m = protein_metrics([true, "IIIIII"], [pred, "IIIIII"])
    assert (m["type_sp"], m["topo_sp"], m["topo_glob"]) == (1.0, 1.0, 1.0)
    assert m["overlap_acc"] == 0.5


def test_wrong_type_with_right_shape_is_not_topology_correct():
    m = protein_metrics(["SSSSSSOOOO"], ["IIIIIIIIII"])  # SP predicted GLOBULAR
    assert (m["type_sp"], m["topo_sp"]) == (0.0, 0.0)


def test_absent_type_is_nan_and_shown_as_absent():
    m = protein_metrics([TM_ONE], [TM_ONE])
    assert m["topo_tm"] == 1.0
    assert _absent(m, "sptm", "sp", "glob", "beta")
    assert m["n_sp"] == 0
    table = format_metrics(m)
    assert "n/a (absent)" in table
    assert table.count("n/a (absent)") == 8  # 4 absent types x (topology, type)


def test_empty_input_is_all_nan():
    m = protein_metrics([], [])
    assert all(math.isnan(m[k]) for k in METRIC_KEYS)
    assert m["n_proteins"] == 0


def test_length_mismatch_names_index_and_id():
    with pytest.raises(ValueError, match=r"protein 1\b.*4 residues.*3"):
        protein_metrics(["IIII", "IIII"], ["IIII", "III"])
    with pytest.raises(ValueError, match=r"protein 1, id 'P2'"):
        protein_metrics(["IIII", "IIII"], ["IIII", "III"], ids=["P1", "P2"])


def test_unknown_letter():
    with pytest.raises(ValueError, match=r"protein 0.*predicted.*'X'"):
        protein_metrics(["IIII"], ["IIXI"])
    with pytest.raises(ValueError, match=r"true.*'i'"):
        protein_result("iiii", "IIII")


def test_list_lengths_differ():
    with pytest.raises(ValueError, match="2 true label strings but 1"):
        protein_metrics(["IIII", "IIII"], ["IIII"])


def test_truth_without_valid_type_is_an_error():
    with pytest.raises(ValueError, match="protein 0.*no valid protein type"):
        protein_metrics(["OOOO"], ["OOOO"])


def test_type_acc_is_unweighted_mean_of_present_types():
    true = ["IIII", "IIII", "IIII", TM_ONE]
    pred = ["IIII", "IIII", "SSII", TM_ONE]  # globular 2/3 right, TM 1/1 right
    m = protein_metrics(true, pred)
    assert m["type_glob"] == pytest.approx(2 / 3)
    assert m["type_acc"] == pytest.approx((2 / 3 + 1) / 2)  # not 3/4


def test_residue_acc_counts_all_residues():
    m = protein_metrics(["IIII", "IIIIII"], ["IIIS", "SSIIII"])  # 3/4 and 4/6 correct
    assert m["residue_acc"] == pytest.approx(7 / 10)
    assert m["n_residues"] == 10


def test_aggregate_of_split_lists_equals_whole():
    true = [TM_ONE, TM_TWO, "SSSSSSOOOO", "IIII", "IIIBBBBOOO", "SSSSSSIIMMMMMMOO"]
    pred = [TM_ONE, TM_TWO_MISSING, "IIIIIIIIII", "OOOO", "IIIIBBBBOO", "SSSSSIIIMMMMMMOO"]
    results = [protein_result(t, p) for t, p in zip(true, pred)]
    shards = [results[:2], results[2:3], results[3:]]
    gathered = [r for shard in reversed(shards) for r in pickle.loads(pickle.dumps(shard))]
    whole = protein_metrics(true, pred)
    assert aggregate(gathered) == pytest.approx(whole, nan_ok=True)
    assert whole["type_acc"] == pytest.approx((1 + 1 + 0 + 0 + 1) / 5)  # tm, sptm, sp, glob, beta


def test_protein_result_fields():
    r = protein_result(TM_ONE, "IIIIIIMMMMMMOOO")
    assert r == ProteinResult("TM", "TM", True, 13, 15)


def test_topo_mean_averages_the_present_types():
    m = protein_metrics([TM_ONE, "IIII", "IIII"], ["IIIIIIIIIIIIIII", "IIII", "OOOO"])
    assert m["topo_tm"] == 0.0 and m["topo_glob"] == 0.5
    assert m["topo_mean"] == pytest.approx(0.25)  # SP+TM, SP and BETA are absent, not zero
