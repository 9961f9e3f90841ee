"""The alphabets: amino-acid and label indices the model, shards and metrics share, and the protein-type rule."""

from __future__ import annotations

import pytest

from protopo_ray.data.alphabet import (
    AA_INDEX,
    AMINO_ACIDS,
    IGNORE_LABEL,
    INVALID_TYPE,
    LABELS,
    NUM_AA_TOKENS,
    NUM_LABELS,
    PROTEIN_TYPES,
    UNKNOWN_AA,
    decode_labels,
    encode_labels,
    encode_sequence,
    protein_type,
)


def test_amino_acid_indices():
    assert encode_sequence("ACDY") == [0, 1, 2, 19]
    assert (UNKNOWN_AA, NUM_AA_TOKENS) == (20, 21)
    assert sorted(AA_INDEX[aa] for aa in AMINO_ACIDS) == list(range(20))


def test_rare_codes_map_to_their_closest_amino_acid_or_unknown():
    # U (selenocysteine) reads as C, O (pyrrolysine) as K; the ambiguity codes are unknown.
    assert encode_sequence("UO") == [AA_INDEX["C"], AA_INDEX["K"]]
    assert encode_sequence("BZJX") == [UNKNOWN_AA] * 4


def test_unknown_letters_raise():
    with pytest.raises(KeyError):
        encode_sequence("a")  # records rejects lowercase before it gets here


def test_labels_in_the_reference_order():
    # The reference project's ints, which the model's output columns follow: I0 O1 P2 S3 M4 B5.
    assert LABELS == "IOPSMB" and NUM_LABELS == 6
    assert encode_labels("SSOMMI") == [3, 3, 1, 4, 4, 0]
    assert decode_labels([3, 3, 1, 4, 4, 0]) == "SSOMMI"
    assert decode_labels(encode_labels("BPOI")) == "BPOI"


def test_ignore_label_is_cross_entropys_default():
    torch = pytest.importorskip("torch")
    assert IGNORE_LABEL == torch.nn.CrossEntropyLoss().ignore_index
    assert IGNORE_LABEL not in range(NUM_LABELS)


@pytest.mark.parametrize(
    "labels, expected",
    [
        ("IIMMMOO", "TM"),
        ("OOMMII", "TM"),
        ("SSSOOMMMII", "SP+TM"),
        ("SSSOOO", "SP"),
        ("IIII", "GLOBULAR"),
        ("SSPPBBBOOBBBPP", "BETA"),  # B wins over S
        ("IIBBMMOO", "BETA"),  # and over M
        ("OOOO", INVALID_TYPE),  # outside without crossing the membrane
        ("PPPP", INVALID_TYPE),
        ("IIOO", INVALID_TYPE),
        ("", INVALID_TYPE),
    ],
)
def test_protein_type(labels, expected):
    assert protein_type(labels) == expected


def test_invalid_is_not_a_protein_type():
    assert INVALID_TYPE not in PROTEIN_TYPES
    assert set(PROTEIN_TYPES) == {"TM", "SP+TM", "SP", "GLOBULAR", "BETA"}
