"""What `predict` writes, in the formats users of topology predictors know from DeepTMHMM.

- `predicted.3line`: `>ID|TYPE`, sequence, predicted labels (the project's 3-line format, readable by `records`);
- `predicted.gff3`: one feature per topology region, DeepTMHMM's region names (signal, inside, outside,
  periplasm, TMhelix, TMbeta) and per-protein comment lines (`# ID Length: L`, `# ID Number of predicted
  TMRs: n`), 1-based inclusive positions. DeepTMHMM itself puts the region name in column 2 and leaves the
  remaining columns empty, which GFF3 readers reject; here the nine columns follow the GFF3 specification
  (source `protopo_ray`, the region name as the type, the region's mean probability as the score,
  strand and phase `.`, an `ID` attribute);
- `summary.tsv`: id, length, predicted type, membrane segments (TM helices + beta strands), mean confidence;
- `plots/<id>.png` (on request): per-residue label probabilities under the decoded topology;
- `rejects.tsv` (when a record was not predicted): id, where it stood, the reason.

The writers stream: they take any iterable of predictions (a `Prediction`, or a `Topology` read back from a
result shard), so outputs of any size are written without holding them in memory.

Pure: numpy and matplotlib (Agg, imported only for plots); no torch, no Ray.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protopo_ray.data.alphabet import LABELS, NUM_LABELS, protein_type
from protopo_ray.model.metrics import segments

#: GFF3 region type per label letter (DeepTMHMM's names).
REGION_NAMES = {"S": "signal", "I": "inside", "O": "outside", "P": "periplasm", "M": "TMhelix", "B": "TMbeta"}
LABEL_OF_REGION = {name: letter for letter, name in REGION_NAMES.items()}
#: Labels whose segments cross the membrane (DeepTMHMM's "TMRs").
MEMBRANE_LABELS = frozenset("MB")
#: One colour per label, shared by the topology track and the probability curves.
LABEL_COLORS = {"I": "#1f77b4", "O": "#ff7f0e", "P": "#9467bd", "S": "#2ca02c", "M": "#d62728", "B": "#8c564b"}
LABEL_NAMES = {"I": "inside", "O": "outside", "P": "periplasm", "S": "signal peptide", "M": "TM helix",
               "B": "beta strand"}

GFF_SOURCE = "protopo_ray"
SUMMARY_COLUMNS = ("id", "length", "predicted_type", "num_membrane_segments", "mean_confidence")
FILES = {"3line": "predicted.3line", "gff3": "predicted.gff3", "summary": "summary.tsv", "plots": "plots",
         "rejects": "rejects.tsv"}
REJECT_COLUMNS = ("id", "source", "reason")


class _Decoded:
    """What every writer reads of a prediction: id, sequence, labels, confidence (and what follows from them)."""

    id: str
    sequence: str
    labels: str

    @property
    def type(self) -> str:
        return protein_type(self.labels)

    @property
    def num_membrane_segments(self) -> int:
        return sum(1 for letter, _, _ in segments(self.labels) if letter in MEMBRANE_LABELS)


@dataclass(frozen=True, slots=True)
class Topology(_Decoded):
    """A prediction as a result shard keeps it: labels and the probability of each decoded label (the per-residue
    distribution itself only when asked for)."""

    id: str
    sequence: str
    labels: str
    confidence: np.ndarray
    """float [L]: the probability of the decoded label at each residue."""
    probabilities: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Prediction(_Decoded):
    """One protein's decoded labels and per-residue label probabilities."""

    id: str
    sequence: str
    labels: str
    """Decoded labels over IOPSMB, one per residue."""
    probabilities: np.ndarray
    """float [L, NUM_LABELS]: softmax of the model's logits, columns in alphabet.LABELS order."""

    def __post_init__(self) -> None:
        length = len(self.sequence)
        if len(self.labels) != length or self.probabilities.shape != (length, NUM_LABELS):
            raise ValueError(f"protein {self.id!r}: {len(self.labels)} labels and probabilities of shape "
                             f"{self.probabilities.shape} for {length} residues; expected ({length}, {NUM_LABELS})")

    @property
    def confidence(self) -> np.ndarray:
        """float [L]: the probability of the decoded label at each residue."""
        columns = np.fromiter((LABELS.index(c) for c in self.labels), dtype=np.int64, count=len(self.labels))
        return self.probabilities[np.arange(len(self.labels)), columns]


def regions(labels: str) -> list[tuple[str, int, int]]:
    """Topology regions as (letter, start, end), 1-based and inclusive like GFF3: "IIMMO" -> I 1-2, M 3-4, O 5-5."""
    return [(letter, start + 1, end) for letter, start, end in segments(labels)]


# ------------------------------------------------------------------------------------------------ writers


def write_3line(path: str | Path, predictions: Iterable[_Decoded]) -> Path:
    path = Path(path)
    with path.open("w") as handle:
        for p in predictions:
            handle.write(f">{p.id}|{p.type}\n{p.sequence}\n{p.labels}\n")
    return path


# GFF3 column 1 may hold these unescaped; everything else is percent-encoded (GFF3 spec, "seqid").
_SEQID_SAFE = re.compile(r"[^a-zA-Z0-9.:^*$@!+_?\-|]")
# Attribute values: tab, newline, CR, %, control characters and the reserved ; = & , are percent-encoded.
_ATTRIBUTE_UNSAFE = re.compile(r"[\x00-\x1f\x7f%;=&,]")


def _percent(match: re.Match) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group(0).encode("utf-8"))


def gff3_seqid(protein_id: str) -> str:
    """A protein id as a GFF3 seqid (percent-encoding what column 1 may not hold, e.g. spaces or '/')."""
    return _SEQID_SAFE.sub(_percent, protein_id)


def gff3_attribute(value: str) -> str:
    return _ATTRIBUTE_UNSAFE.sub(_percent, value)


def write_gff3(path: str | Path, predictions: Iterable[_Decoded],
               sequence_regions: Iterable[tuple[str, int]] | None = None) -> Path:
    """One GFF3 file for all proteins: sequence-region pragmas first, then each protein's comment block and regions.
    `sequence_regions` ((id, length) per protein, in order) lets `predictions` be a stream read once; without it
    they are held to write the pragmas first."""
    path = Path(path)
    if sequence_regions is None:
        predictions = list(predictions)
        sequence_regions = [(p.id, len(p.sequence)) for p in predictions]
    with path.open("w") as handle:
        handle.write("##gff-version 3\n")
        for protein_id, length in sequence_regions:
            handle.write(f"##sequence-region {gff3_seqid(protein_id)} 1 {length}\n")
        for p in predictions:
            seqid = gff3_seqid(p.id)
            handle.write(f"# {seqid} Length: {len(p.sequence)}\n# {seqid} Number of predicted TMRs: "
                         f"{p.num_membrane_segments}\n")
            confidence = p.confidence
            for number, (letter, start, end) in enumerate(regions(p.labels), start=1):
                score = f"{confidence[start - 1:end].mean():.3f}"
                attributes = f"ID={gff3_attribute(p.id)}_{number}"
                handle.write("\t".join((seqid, GFF_SOURCE, REGION_NAMES[letter], str(start), str(end), score, ".",
                                        ".", attributes)) + "\n")
    return path


def summary_rows(predictions: Iterable[_Decoded]) -> Iterable[dict[str, str | int | float]]:
    for p in predictions:
        yield {"id": p.id, "length": len(p.sequence), "predicted_type": p.type,
               "num_membrane_segments": p.num_membrane_segments,
               "mean_confidence": round(float(p.confidence.mean()), 4)}


def write_summary(path: str | Path, predictions: Iterable[_Decoded]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(summary_rows(predictions))
    return path


def write_rejects(path: str | Path, rejects: Iterable) -> Path:
    """rejects.tsv: one line per record that was not predicted (anything with id, source and reason)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(REJECT_COLUMNS)
        writer.writerows((r.id, r.source, " ".join(r.reason.split())) for r in rejects)
    return path


# ------------------------------------------------------------------------------------------------- plots


def plot_file_name(protein_id: str) -> str:
    """A file name for a protein's plot: characters outside [A-Za-z0-9._-] become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", protein_id) + ".png"


def plot_prediction(path: str | Path, prediction: Prediction) -> Path:
    """PNG: the decoded topology (membrane band, inside/outside lines, TM and signal blocks) above the
    per-residue probability of every decoded label and every other label that reaches 2 % anywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    p = prediction
    length = len(p.sequence)
    x = np.arange(1, length + 1)
    width = float(np.clip(length / 40, 8, 16))
    fig, (track, curves) = plt.subplots(2, 1, figsize=(width, 4.2), sharex=True,
                                        gridspec_kw={"height_ratios": [1, 3.2], "hspace": 0.08})
    # Topology track: the membrane as a grey band; cytoplasmic side (I, and P of outer-membrane barrels) below.
    track.axhspan(0.3, 0.7, color="0.88", zorder=0)
    side = {"I": 0.12, "P": 0.12, "O": 0.88}
    for letter, start, end in regions(p.labels):
        lo, hi = start - 0.5, end + 0.5
        color = LABEL_COLORS[letter]
        if letter in side:
            track.plot([lo, hi], [side[letter]] * 2, color=color, lw=3, solid_capstyle="butt")
        elif letter in MEMBRANE_LABELS:
            track.add_patch(Rectangle((lo, 0.22), hi - lo, 0.56, color=color, zorder=2))
        else:  # signal peptide: a block on the side it is cleaved from
            track.add_patch(Rectangle((lo, 0.04), hi - lo, 0.16, color=color, zorder=2))
    track.set_ylim(0, 1)
    track.set_yticks([0.12, 0.5, 0.88], ["in", "membrane", "out"], fontsize=8)
    track.tick_params(axis="x", bottom=False)
    for spine in ("top", "right", "bottom"):
        track.spines[spine].set_visible(False)
    track.set_title(f"{p.id}  ·  {p.type}  ·  {p.num_membrane_segments} membrane segment(s)  ·  {length} residues  ·  "
                    f"mean confidence {p.confidence.mean():.2f}", fontsize=10, loc="left")
    # Probability curves: one line per label that ever reaches 2 %; one legend (track and curves share colours).
    shown = [c for i, c in enumerate(LABELS) if c in p.labels or p.probabilities[:, i].max() >= 0.02]
    for letter in shown:
        curves.plot(x, p.probabilities[:, LABELS.index(letter)], color=LABEL_COLORS[letter], lw=1.3,
                    label=LABEL_NAMES[letter])
    curves.set_xlim(0.5, length + 0.5)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))  # residues: no 1.5 on short proteins
    curves.set_ylim(-0.02, 1.02)
    curves.set_ylabel("probability")
    curves.set_xlabel("residue")
    curves.grid(axis="y", color="0.9", lw=0.6)
    curves.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    for spine in ("top", "right"):
        curves.spines[spine].set_visible(False)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(out_dir: str | Path, predictions: Sequence[Prediction], plots: bool = False,
                  rejects: Sequence = ()) -> dict[str, Path]:
    """predicted.3line, predicted.gff3, summary.tsv (and plots/<id>.png, rejects.tsv where a record was not
    predicted) under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"3line": write_3line(out_dir / FILES["3line"], predictions),
               "gff3": write_gff3(out_dir / FILES["gff3"], predictions),
               "summary": write_summary(out_dir / FILES["summary"], predictions)}
    if rejects:
        written["rejects"] = write_rejects(out_dir / FILES["rejects"], rejects)
    if plots:
        plot_dir = out_dir / FILES["plots"]
        plot_dir.mkdir(exist_ok=True)
        names: dict[str, str] = {}
        for p in predictions:
            name = plot_file_name(p.id)
            if name in names:  # two ids that differ only in replaced characters
                name = f"{name[:-4]}_{len(names)}.png"
            names[name] = p.id
            plot_prediction(plot_dir / name, p)
        written["plots"] = plot_dir
    return written
