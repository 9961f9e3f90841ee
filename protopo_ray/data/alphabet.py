"""The three alphabets the project speaks: amino acids, residue labels and protein types.

Kept in one tiny module so that records, graphs, metrics and the model agree on every index.
"""

from __future__ import annotations

#: The 20 standard amino acids; index 20 is "unknown" (X and the ambiguous codes).
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
UNKNOWN_AA = len(AMINO_ACIDS)
NUM_AA_TOKENS = len(AMINO_ACIDS) + 1

#: Rare or ambiguous one-letter codes and what they are read as. Selenocysteine (U) and pyrrolysine (O)
#: are chemically closest to C and K; the ambiguity codes B (D/N), Z (E/Q), J (I/L) and X are "unknown".
RARE_AMINO_ACIDS = {"U": "C", "O": "K", "B": "X", "Z": "X", "J": "X", "X": "X"}

AA_INDEX: dict[str, int] = {aa: i for i, aa in enumerate(AMINO_ACIDS)}
AA_INDEX.update({rare: AA_INDEX.get(to, UNKNOWN_AA) for rare, to in RARE_AMINO_ACIDS.items()})

#: Residue classes, in the order of the model's output (the reference project's ints: I0 O1 P2 S3 M4 B5).
LABELS = "IOPSMB"
LABEL_INDEX: dict[str, int] = {c: i for i, c in enumerate(LABELS)}
NUM_LABELS = len(LABELS)
#: Label index of residues without a label (prediction inputs): torch.nn.CrossEntropyLoss's default ignore_index.
IGNORE_LABEL = -100

#: Protein types read off the labels; INVALID is what a prediction can be and a truth never is.
PROTEIN_TYPES = ("TM", "SP+TM", "SP", "GLOBULAR", "BETA")
INVALID_TYPE = "INVALID"


def encode_sequence(sequence: str) -> list[int]:
    """Amino-acid indices for a sequence already validated by `records` (unknown letters raise KeyError)."""
    return [AA_INDEX[c] for c in sequence]


def encode_labels(labels: str) -> list[int]:
    """Label indices (I0 O1 P2 S3 M4 B5) for a validated label string."""
    return [LABEL_INDEX[c] for c in labels]


def decode_labels(indices) -> str:
    """Label string from an iterable of label indices."""
    return "".join(LABELS[int(i)] for i in indices)


def protein_type(labels: str) -> str:
    """Protein type read off a label string (DeepTMHMM's rule); INVALID_TYPE when it is none of the five.

    B -> BETA; else M with S -> SP+TM; M -> TM; S -> SP; only I -> GLOBULAR. Anything else (only O/P, I with
    O/P but no S, M or B, or empty) is INVALID: the chain would reach the outside without crossing the membrane.
    Truth labels must have a type (`records` rejects those that do not); a prediction may be INVALID, which
    `metrics` never counts as correct.
    """
    letters = set(labels)
    if "B" in letters:
        return "BETA"
    if "M" in letters:
        return "SP+TM" if "S" in letters else "TM"
    if "S" in letters:
        return "SP"
    if letters == {"I"}:
        return "GLOBULAR"
    return INVALID_TYPE
