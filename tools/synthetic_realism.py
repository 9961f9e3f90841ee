"""How much of real proteins' sequence signal the synthetic generator carries, and at what noise level.

    python -m tools.synthetic_realism ../shared/data/deeptmhmm/DeepTMHMM.derived.3line --synthetic 2000

Side by side for the real labels and the generator's proteins: composition per label region (hydrophobic share,
K+R share), segment lengths, the positive-inside rule (K+R within 15 residues of a helix, cytoplasmic vs outside
loops), signal peptides (length, K+R in the first 5, A at -3 and -1), strand counts, and two one-line classifiers
a model must beat: a Kyte-Doolittle window of 19 calling M residues (threshold picked on each set itself, so the
figure is that set's best) and "the inside loop is the side with more K+R next to the helices" per TM protein.
Synthetic far above real on these means the task is trivially easy; far below, the sequences carry no signal.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import numpy as np

from protopo_ray.data.records import read_3line
from protopo_ray.data.synthetic import generate_proteins

KD = dict(zip("ACDEFGHIKLMNPQRSTVWY", (1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8, 1.9, -3.5, -1.6, -3.5,
                                       -4.5, -0.8, -0.7, 4.2, -0.9, -1.3)))
HYDROPHOBIC = set("AILMFVW")


def _windows(sequence: str, width: int = 19) -> np.ndarray:
    values = np.array([KD.get(a, 0.0) for a in sequence])
    kernel = np.ones(width) / width
    return np.convolve(np.pad(values, width // 2, mode="edge"), kernel, mode="valid")


def summarise(proteins: list[tuple[str, str, str]]) -> dict[str, float]:
    """(type, sequence, labels) -> the figures of the module docstring."""
    share = defaultdict(lambda: [0, 0, 0])  # label -> [hydrophobic, K+R, residues]
    lengths = defaultdict(list)
    near = {"I": [0, 0], "O": [0, 0]}
    inside_right, inside_total = 0, 0
    sp_len, sp_pos, sp_axa = [], [], []
    strands = []
    scores, truth = [], []
    for kind, seq, labels in proteins:
        for a, label in zip(seq, labels):
            cell = share[label]
            cell[0] += a in HYDROPHOBIC
            cell[1] += a in "KR"
            cell[2] += 1
        for match in re.finditer(r"(.)\1*", labels):
            lengths[match.group(1)].append(len(match.group(0)))
        if "S" in labels:
            n = labels.count("S")
            sp_len.append(n)
            sp_pos.append(sum(a in "KR" for a in seq[1:6]) / 5)
            sp_axa.append(seq[n - 3] in "AGS" and seq[n - 1] in "AGS")
        if kind == "BETA":
            strands.append(len(re.findall(r"B+", labels)))
        if kind in ("TM", "SP+TM"):
            scores.append(_windows(seq))
            truth.append(np.array([c == "M" for c in labels]))
            counts = {"I": [0, 0], "O": [0, 0]}
            for match in re.finditer(r"M+", labels):
                for lo, hi in ((match.start() - 15, match.start()), (match.end(), match.end() + 15)):
                    for i in range(max(lo, 0), min(hi, len(seq))):
                        if labels[i] in counts:
                            counts[labels[i]][0] += seq[i] in "KR"
                            counts[labels[i]][1] += 1
            for side in near:
                near[side][0] += counts[side][0]
                near[side][1] += counts[side][1]
            if counts["I"][1] and counts["O"][1]:
                inside_total += 1
                inside_right += counts["I"][0] / counts["I"][1] > counts["O"][0] / counts["O"][1]
    out: dict[str, float] = {}
    for label in "IOSMBP":
        h, kr, n = share[label]
        if n:
            out[f"hydrophobic_{label}"], out[f"KR_{label}"] = h / n, kr / n
    for label in "MB":
        if lengths[label]:
            out[f"len_{label}_mean"], out[f"len_{label}_sd"] = np.mean(lengths[label]), np.std(lengths[label])
    out["KR_near_helix_I"] = near["I"][0] / max(1, near["I"][1])
    out["KR_near_helix_O"] = near["O"][0] / max(1, near["O"][1])
    out["positive_inside_acc"] = inside_right / max(1, inside_total)
    if sp_len:
        out["sp_len_mean"], out["sp_KR_n"], out["sp_AxA"] = np.mean(sp_len), np.mean(sp_pos), np.mean(sp_axa)
    if strands:
        out["strands_mean"], out["strands_odd"] = np.mean(strands), np.mean(np.array(strands) % 2 == 1)
    if scores:
        score, label = np.concatenate(scores), np.concatenate(truth)
        best = max((np.mean((score > t) == label), t) for t in np.arange(-1.0, 3.0, 0.1))
        out["kd19_residue_acc"], out["kd19_threshold"] = best
        out["kd19_M_share"] = label.mean()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", help="a 3-line file with DeepTMHMM labels")
    parser.add_argument("--synthetic", type=int, default=2000, help="synthetic proteins to generate")
    args = parser.parse_args()
    real = [(r.type, r.sequence, r.labels) for r in read_3line(args.real).records]
    synthetic = [(r.type, r.sequence, r.labels) for r, _ in generate_proteins(args.synthetic)]
    a, b = summarise(real), summarise(synthetic)
    print(f"{'figure':<22}{'real':>10}{'synthetic':>11}")
    for key in a:
        print(f"{key:<22}{a[key]:>10.3f}{b.get(key, float('nan')):>11.3f}")


if __name__ == "__main__":
    main()
