"""DeepTMHMM records: read and validate 3-line files and the partitions JSON."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProteinRecord:
    """One labelled (or, for prediction, unlabelled) protein."""

    id: str
    sequence: str
    """Validated one-letter sequence; rare codes (U, O, B, Z, J, X) kept as written (see alphabet.AA_INDEX)."""
    labels: str = ""
    """Per-residue labels over IOPSMB, same length as `sequence`; empty when unlabelled."""
    type: str = ""
    """Protein type (TM, SP+TM, SP, GLOBULAR, BETA) derived from the labels; empty when unlabelled."""
    fold: str = ""
    """Partition, e.g. cv0..cv4 (partitions JSON) or train/val/test (synthetic)."""
    source: str = ""
    """Where it came from: 'file:line' or 'file:$.cv0[12]'."""
