"""The synthetic default data set: deterministic, DeepTMHMM-shaped, geometrically sane and not a lookup task."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from protopo_ray.data.alphabet import AMINO_ACIDS, LABELS, PROTEIN_TYPES
from protopo_ray.data.records import label_type
from protopo_ray.data.synthetic import TYPE_FRACTIONS, allocate_types, generate_proteins


@pytest.fixture(scope="module")
def proteins():
    return generate_proteins(1000, seed=0)


def test_same_seed_is_identical_and_other_seed_differs():
    a, b, c = generate_proteins(30, seed=3), generate_proteins(30, seed=3), generate_proteins(30, seed=4)
    assert [r for r, _ in a] == [r for r, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert [r.sequence for r, _ in a] != [r.sequence for r, _ in c]


def test_type_proportions_on_1000(proteins):
    counts = Counter(r.type for r, _ in proteins)
    for protein_type, fraction in TYPE_FRACTIONS.items():
        assert abs(counts[protein_type] / 1000 - fraction) < 0.01, (protein_type, counts)


@pytest.mark.parametrize("n", [5, 20, 37])
def test_small_sets_hold_every_type(n):
    assert set(allocate_types(n)) == set(PROTEIN_TYPES)
    assert len(allocate_types(n)) == n


def test_folds_are_stratified_70_15_15(proteins):
    for protein_type in PROTEIN_TYPES:
        folds = Counter(r.fold for r, _ in proteins if r.type == protein_type)
        total = sum(folds.values())
        assert abs(folds["train"] / total - 0.70) < 0.06, (protein_type, folds)
        assert abs(folds["val"] / total - 0.15) < 0.06 and abs(folds["test"] / total - 0.15) < 0.06


def test_records_are_valid_deeptmhmm_records(proteins):
    ids = [r.id for r, _ in proteins]
    assert len(set(ids)) == len(ids) and ids[123] == "SYN000123"
    for record, ca in proteins:
        assert len(record.sequence) == len(record.labels) == len(ca) >= 50
        assert set(record.sequence) <= set(AMINO_ACIDS) and set(record.labels) <= set(LABELS)
        assert label_type(record.labels) == record.type
        assert record.sequence[0] == "M"
        if record.type in ("SP", "SP+TM", "BETA"):  # signal peptide first, then outside (or periplasm)
            body = record.labels.lstrip("S")
            assert record.labels[0] == "S" and body[0] == ("P" if record.type == "BETA" else "O")
            assert "S" not in body
        if record.type == "GLOBULAR":
            assert set(record.labels) == {"I"}


def test_tm_helices_are_hydrophobic_and_of_realistic_length(proteins):
    hydrophobic = set("LIVFAMWG")
    inside_kr, outside_kr, fractions = [], [], []
    for record, _ in proteins:
        labels = np.array(list(record.labels))
        seq = np.array(list(record.sequence))
        if "M" not in record.labels:
            continue
        runs = [len(run) for run in record.labels.replace("I", " ").replace("O", " ").replace("S", " ").split()]
        assert all(17 <= n <= 25 for n in runs), runs
        fractions.append(np.isin(seq[labels == "M"], list(hydrophobic)).mean())
        inside_kr.append(np.isin(seq[labels == "I"], ["K", "R"]).mean())
        outside_kr.append(np.isin(seq[labels == "O"], ["K", "R"]).mean())
    assert np.mean(fractions) > 0.7
    assert np.nanmean(inside_kr) > 1.5 * np.nanmean(outside_kr)  # positive-inside rule


def test_coordinates_are_finite_chains_with_membrane_geometry(proteins):
    for record, ca in proteins:
        assert ca.shape == (len(record.sequence), 3) and np.isfinite(ca).all()
        steps = np.linalg.norm(np.diff(ca, axis=0), axis=1)
        assert np.abs(steps - 3.8).max() < 0.1, record.id  # loops, helices (3.83) and strands alike
        labels = np.array(list(record.labels))
        if record.type in ("TM", "BETA"):
            core = ca[np.isin(labels, ["M", "B"])][:, 2]
            assert np.abs(core).max() < 20  # membrane segments lie in the slab
            assert ca[labels == "O"][:, 2].mean() > 0 > ca[np.isin(labels, ["I", "P"])][:, 2].mean()


def test_a_per_residue_lookup_does_not_solve_it(proteins):
    counts: dict[str, Counter] = defaultdict(Counter)
    for record, _ in proteins:
        for aa, label in zip(record.sequence, record.labels):
            counts[aa][label] += 1
    lookup = {aa: c.most_common(1)[0][0] for aa, c in counts.items()}
    predicted = ["".join(lookup[aa] for aa in r.sequence) for r, _ in proteins]
    residues = sum(len(r.labels) for r, _ in proteins)
    correct = sum(p == t for (r, _), pred in zip(proteins, predicted) for p, t in zip(pred, r.labels))
    assert correct / residues < 0.8
    type_acc = np.mean([label_type(pred) == r.type for (r, _), pred in zip(proteins, predicted)])
    assert type_acc <= TYPE_FRACTIONS["GLOBULAR"] + 0.02  # no better than always answering GLOBULAR


def test_context_makes_it_learnable(proteins):
    """A 15-residue hydrophobicity window finds TM helices far better than any single residue does."""
    hydrophobic = set("LIVFMWA")
    flags = [np.array([aa in hydrophobic for aa in r.sequence], dtype=float) for r, _ in proteins[:300]]
    single = np.concatenate(flags) > 0.5
    window = np.concatenate([np.convolve(f, np.ones(15) / 15, mode="same") for f in flags])
    truth = np.concatenate([np.array(list(r.labels)) == "M" for r, _ in proteins[:300]])

    def f1(predicted):
        return 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())

    best_window = max(f1(window > threshold) for threshold in np.arange(0.4, 0.95, 0.05))
    assert best_window > 2 * f1(single)


def test_a_type_mix_sets_the_proportions_and_bad_mixes_are_named():
    from protopo_ray.data.synthetic import check_mix

    types = allocate_types(400, seed=0, mix={"TM": 25, "SP+TM": 10, "SP": 15, "GLOBULAR": 35, "BETA": 15})
    counts = {t: types.count(t) for t in set(types)}
    assert counts == {"TM": 100, "SP+TM": 40, "SP": 60, "GLOBULAR": 140, "BETA": 60}
    with pytest.raises(ValueError, match="shares > 0 for types among"):
        check_mix({"TM": 1, "ALPHA": 1})
    with pytest.raises(ValueError, match="shares > 0"):
        check_mix({"TM": 0})


# ---- the sequence signals real proteins carry (issue 27: a model trained on these must work from a FASTA) ----

def _segments(labels: str, label: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(f"{label}+", labels)]


def test_helix_flanks_follow_the_positive_inside_rule_most_strongly(proteins):
    near, far, out = [], [], []
    for record, _ in proteins:
        if record.type not in ("TM", "SP+TM"):
            continue
        seq, labels = record.sequence, record.labels
        flank = np.zeros(len(seq), dtype=bool)
        for start, end in _segments(labels, "M"):
            flank[max(start - 6, 0):start] = True
            flank[end:end + 6] = True
        kr = np.array([a in "KR" for a in seq])
        inside = np.array([c == "I" for c in labels])
        outside = np.array([c == "O" for c in labels])
        near.append(kr[flank & inside].mean() if (flank & inside).any() else np.nan)
        far.append(kr[~flank & inside].mean() if (~flank & inside).any() else np.nan)
        out.append(kr[flank & outside].mean() if (flank & outside).any() else np.nan)
    assert np.nanmean(near) > 1.5 * np.nanmean(far) > 1.5 * np.nanmean(out)


def test_signal_peptides_have_n_h_c_regions(proteins):
    pos_n, hydro_h, hydro_rest, axa = [], [], [], []
    for record, _ in proteins:
        n = record.labels.count("S")
        if not n:
            continue
        assert 14 <= n <= 31, (record.id, n)
        seq = record.sequence
        pos_n.append(np.mean([a in "KR" for a in seq[1:5]]))
        hydro_h.append(np.mean([a in "AILMFVW" for a in seq[max(n - 14, 5):n - 5]]))  # past n, before c
        hydro_rest.append(np.mean([a in "AILMFVW" for a in seq[n:]]))
        axa.append(seq[n - 3] == "A" and seq[n - 1] in "AGS")
    assert np.mean(pos_n) > 0.2 and np.mean(hydro_h) > np.mean(hydro_rest) + 0.2
    assert 0.5 < np.mean(axa) < 0.9  # the cleavage motif, usually but not always (as in real signal peptides)


def test_barrel_strands_alternate_and_count_even(proteins):
    facing, away = [], []
    for record, _ in proteins:
        if record.type != "BETA":
            continue
        strands = _segments(record.labels, "B")
        assert len(strands) % 2 == 0 and 8 <= len(strands) <= 24
        for start, end in strands:
            inner = record.sequence[start + 1:end - 1]  # the girdle residues at the ends are aromatic either way
            facing += [a in "AILMFVWY" for a in inner[1::2]]  # even positions of the strand: the lipid side
            away += [a in "AILMFVWY" for a in inner[0::2]]
    assert np.mean(facing) > np.mean(away) + 0.3


def test_soluble_regions_are_no_more_hydrophobic_than_real_ones(proteins):
    # DeepTMHMM's labels: 33 % of I and O residues are A I L M F V W, 65 % of M residues (tools/synthetic_realism).
    soluble = [a in "AILMFVW" for r, _ in proteins for a, c in zip(r.sequence, r.labels) if c in "IO"]
    membrane = [a in "AILMFVW" for r, _ in proteins for a, c in zip(r.sequence, r.labels) if c == "M"]
    assert np.mean(soluble) < 0.40 and np.mean(membrane) > 0.6
