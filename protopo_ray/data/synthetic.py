"""The embedded default data set: synthetic labelled proteins with C-alpha traces, generated in pure numpy.

It exists so that every part of the pipeline (prepare -> shards -> training -> tuning) runs with no download.
The proteins follow DeepTMHMM's conventions and type mix (GLOBULAR all I; SP = S then O; TM = alternating I/O
loops around M helices; SP+TM = S, O, then M segments; BETA = S, P, then B strands alternating O and P), and the
traces put TM helices and beta strands into bundles/barrels crossing a membrane slab at z in [-15, 15] Angstrom,
so the kNN graph carries real structure. This module lays proteins out and traces them;
`synthetic_sequences` draws their residues with the signals real sequences carry (hydrophobic membrane cores,
positive-inside, signal peptides' n/h/c regions, alternating barrel strands) at a realistic noise level, so a
model trained on them also works from sequence alone (a FASTA's proteins get no structure).

Each protein is generated from its own generator `default_rng([seed, index])`: same seed -> identical data.
"""

from __future__ import annotations

import math

import numpy as np

from protopo_ray.data.alphabet import PROTEIN_TYPES
from protopo_ray.data.records import ProteinRecord, label_type
from protopo_ray.data.synthetic_sequences import GENERATOR_VERSION, protein_sequence  # noqa: F401 (the set's version)

#: DeepTMHMM-like protein type proportions.
TYPE_FRACTIONS = {"GLOBULAR": 0.56, "SP": 0.28, "TM": 0.11, "SP+TM": 0.03, "BETA": 0.02}
FOLD_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
MEDIAN_LENGTH, LENGTH_SIGMA, MIN_LENGTH, MAX_LENGTH = 350, 0.5, 50, 1200
STEP = 3.8  # CA-CA distance, Angstrom
HELIX_RISE, HELIX_TURN, HELIX_RADIUS = 1.5, np.deg2rad(100.0), 2.3
STRAND_RISE = 3.3
STRAND_ZIGZAG = np.sqrt(STEP**2 - STRAND_RISE**2)  # makes consecutive strand residues 3.8 A apart too
BARREL_TILT = 0.6  # radians; strands lean the same way, as in real barrels
MEMBRANE_HALF = 15.0

# ----------------------------------------------------------------------------------------------- layout
# A protein is a list of segments (label, length, shape, composition). Shapes: "coil" (flexible), "helix",
# "strand" (rigid, free placement) and "tm_helix", "tm_strand" (rigid, placed in the membrane bundle/barrel).


def _soluble(rng, label: str, length: int, coil: str) -> list[tuple]:
    """A soluble region: a plain loop, or (when long) a small domain of amphipathic helices and strands."""
    if length < 30:
        return [(label, length, "coil", coil)]
    segments, left = [], length
    head = int(rng.integers(3, 8))
    segments.append((label, head, "coil", coil))
    left -= head
    while left > 30:
        if rng.random() < 0.65:
            size = int(rng.integers(10, 19))
            segments.append((label, size, "helix", "amphipathic"))
        else:
            size = int(rng.integers(5, 9))
            segments.append((label, size, "strand", "soluble_strand"))
        gap = int(rng.integers(3, 9))
        segments.append((label, gap, "coil", coil))
        left -= size + gap
    segments.append((label, left, "coil", coil))
    return segments


def _split(rng, total: int, minimums: list[int]) -> list[int]:
    """Split `total` residues over loops with the given minimum lengths (Dirichlet for uneven loops)."""
    spare = total - sum(minimums)
    shares = rng.dirichlet(np.full(len(minimums), 0.7)) * spare
    sizes = np.floor(shares).astype(int)
    sizes[: spare - sizes.sum()] += 1
    return [m + int(s) for m, s in zip(minimums, sizes)]


def _signal_peptide(rng) -> list[tuple]:
    # n 3-8 positive, h 7-15 hydrophobic, c 4-8 small/polar: 14-31, mean ~22 (DeepTMHMM's labels: mean 24)
    return [("S", int(rng.integers(3, 9)), "coil", "sp_n"), ("S", int(rng.integers(7, 16)), "helix", "sp_h"),
            ("S", int(rng.integers(4, 9)), "coil", "sp_c")]


def _membrane_protein(rng, length: int, signal: bool) -> list[tuple]:
    segments = _signal_peptide(rng) if signal else []
    budget = length - sum(s[1] for s in segments)
    counts = np.array([30, 14, 8, 10, 7, 8, 10, 4, 3, 3, 3, 4, 2, 2], dtype=float)
    num_helices = int(rng.choice(np.arange(1, 15), p=counts / counts.sum()))
    num_helices = max(1, min(num_helices, (budget - 8) // 28))
    helix_sizes = [int(rng.integers(17, 26)) for _ in range(num_helices)]
    minimums = [4 if signal else 2] + [4] * (num_helices - 1) + [2]
    loops = _split(rng, budget - sum(helix_sizes), minimums)
    side = "O" if signal or rng.random() < 0.3 else "I"
    for i, loop in enumerate(loops):
        segments += _soluble(rng, side, loop, "inside" if side == "I" else "outside")
        if i < num_helices:
            segments.append(("M", helix_sizes[i], "tm_helix", "tm_helix"))
            side = "O" if side == "I" else "I"
    return segments


def _beta_protein(rng, length: int) -> list[tuple]:
    segments = _signal_peptide(rng)
    budget = length - sum(s[1] for s in segments)
    num_strands = 8
    for candidate in (24, 22, 18, 16, 14, 12, 10):
        if candidate * 17 + 10 <= budget and rng.random() < 0.5:
            num_strands = candidate
            break
    strand_sizes = [int(rng.integers(8, 13)) for _ in range(num_strands)]
    # Loops: N-terminal P, then after each strand O (long) or P (short turn), ending in P.
    minimums = [5] + [6 if i % 2 == 0 else 2 for i in range(num_strands)]
    spare = budget - sum(strand_sizes) - sum(minimums)
    loops = list(minimums)
    turns = [i for i in range(1, num_strands + 1) if i % 2 == 0]
    for _ in range(max(spare, 0)):  # periplasmic turns stay short (<= 6); the rest goes to O loops and N term
        i = int(rng.integers(0, len(loops)))
        loops[i if not (i in turns and loops[i] >= 6) else 0] += 1
    segments += _soluble(rng, "P", loops[0], "peri_turn" if loops[0] < 30 else "background")
    for i in range(num_strands):
        segments.append(("B", strand_sizes[i], "tm_strand", "tm_strand"))
        label = "O" if i % 2 == 0 else "P"
        # Plain loops, no soluble helices and strands: a barrel's long outside loops are flexible, and a soluble
        # strand inside one would read like another membrane strand from sequence.
        segments.append((label, loops[i + 1], "coil", "barrel_loop" if label == "O" else "peri_turn"))
    return segments


def _layout(rng, protein_type: str, length: int) -> list[tuple]:
    if protein_type == "GLOBULAR":
        return _soluble(rng, "I", length, "background")
    if protein_type == "SP":
        signal = _signal_peptide(rng)
        return signal + _soluble(rng, "O", length - sum(s[1] for s in signal), "background")
    if protein_type in ("TM", "SP+TM"):
        return _membrane_protein(rng, max(length, 80), signal=protein_type == "SP+TM")
    return _beta_protein(rng, max(length, 220))


# ------------------------------------------------------------------------------------------ coordinates


# Plain-float norm and cross: these run per residue, where numpy's small-array overhead dominated the profile.
def _norm(v: np.ndarray) -> float:
    return math.sqrt(float(v @ v))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(_norm(v), 1e-9)


def _frame(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = _unit(_cross(axis, helper))
    return u, _cross(axis, u)


def _helix(n: int, axis: np.ndarray, phase: float) -> np.ndarray:
    """Ideal alpha-helix CA trace (rise 1.5 A, 100 deg/residue, radius 2.3 A), first residue at the origin."""
    u, v = _frame(axis)
    t = np.arange(n)[:, None]
    angle = phase + t * HELIX_TURN
    xyz = axis * t * HELIX_RISE + HELIX_RADIUS * (np.cos(angle) * u + np.sin(angle) * v)
    return xyz - xyz[0]


def _strand(n: int, axis: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Beta-strand CA trace: 3.3 A per residue along the axis, zig-zag with even residues pointing `outward`."""
    outward = _unit(outward - axis * float(axis @ outward))
    t = np.arange(n)[:, None]
    sign = np.where(t % 2 == 0, 0.5, -0.5)
    xyz = axis * t * STRAND_RISE + sign * STRAND_ZIGZAG * outward
    return xyz - xyz[0]


def _membrane_elements(segments: list[tuple]) -> dict[int, np.ndarray]:
    """Nominal coordinates of TM helices (bundle) and strands (barrel), keyed by segment index."""
    members = [i for i, s in enumerate(segments) if s[2] in ("tm_helix", "tm_strand")]
    placed: dict[int, np.ndarray] = {}
    if not members:
        return placed
    barrel = segments[members[0]][2] == "tm_strand"
    spacing = 4.8 / np.cos(BARREL_TILT) if barrel else 10.0
    radius = len(members) * spacing / (2 * np.pi) if len(members) > 1 else 0.0
    for slot, i in enumerate(members):
        label_before = next((s[0] for s in reversed(segments[:i]) if s[0] in "IOP"), "I")
        up = 1.0 if label_before in "IP" else -1.0  # I and P lie below the slab (z < 0), O above
        theta = 2 * np.pi * slot / len(members)
        radial = np.array([np.cos(theta), np.sin(theta), 0.0])
        tangent = np.array([-np.sin(theta), np.cos(theta), 0.0])
        center = radius * radial
        n = segments[i][1]
        if barrel:
            axis = _unit(np.array([0.0, 0.0, up]) * np.cos(BARREL_TILT) + tangent * np.sin(BARREL_TILT))
            xyz = _strand(n, axis, radial)
            rise = STRAND_RISE
        else:
            axis = np.array([0.0, 0.0, up])
            xyz = _helix(n, axis, phase=slot * 1.3)
            rise = HELIX_RISE
        placed[i] = xyz + center - axis * rise * (n - 1) / 2
    return placed


class _Tracer:
    """Builds the CA trace residue by residue with exact 3.8 A steps, closing loops onto fixed membrane anchors."""

    def __init__(self, rng, membrane: bool):
        self.rng = rng
        self.membrane = membrane
        self.points: list[np.ndarray] = []
        self.total = np.zeros(3)  # running sum of the points, for the centroid without O(L^2) means

    def add(self, xyz) -> None:
        xyz = np.atleast_2d(xyz)
        self.points.extend(xyz)
        self.total += xyz.sum(axis=0)

    def _direction(self, p: np.ndarray, label: str, target: np.ndarray | None, steps_left: int) -> np.ndarray:
        d = self.rng.normal(size=3)
        if target is not None:
            d += 1.5 * _unit(target - p) * min(1.0, 6.0 / max(steps_left, 1))
        if self.membrane and label in "IOP":
            side = 1.0 if label == "O" else -1.0  # soluble loops stay away from the slab
            d[2] += 0.8 * side * (abs(p[2]) < MEMBRANE_HALF + 8 or np.sign(p[2]) != side)
            # ... but fold up near the bundle instead of wandering off (long loops are soluble domains).
            home = np.array([0.0, 0.0, side * (MEMBRANE_HALF + 20.0)])
            d += 0.6 * _unit(home - p) * min(1.0, _norm(home - p) / 30.0)
        elif len(self.points) > 3:  # globular: drift back to the centre for a compact fold
            centre = self.total / len(self.points)
            d += 0.5 * _unit(centre - p) * min(1.0, _norm(centre - p) / 12.0)
        return _unit(d)

    def coil(self, label: str, n: int, target: np.ndarray | None, after: int) -> None:
        """`n` flexible residues; `target` (if any) is reached `after` further residues past this coil."""
        for k in range(n):
            p = self.points[-1] if self.points else np.zeros(3)
            steps_left = n - k + after + 1  # 3.8 A steps from p to the target
            if not self.points:
                # The chain starts near its first anchor (on the loop's own side), not a whole loop length away.
                offset = self.rng.normal(size=3)
                offset[2] = abs(offset[2]) * (1.0 if label == "O" else -1.0)
                q = np.zeros(3) if target is None else target + STEP * min(0.5 * steps_left, 3.0) * _unit(offset)
            elif target is not None and steps_left == 2:
                # Last residue before the target: close exactly with two 3.8 A steps.
                gap = target - p
                half = _norm(gap) / 2
                perp = _unit(_cross(gap, self.rng.normal(size=3)))
                q = p + gap / 2 + np.sqrt(max(STEP**2 - half**2, 0.0)) * perp
            else:
                q = None
                for _ in range(16):
                    q = p + STEP * self._direction(p, label, target, steps_left)
                    if target is None or _norm(target - q) <= 0.92 * STEP * (steps_left - 1):
                        break
                else:
                    q = p + STEP * _unit(target - p)  # always keeps the target reachable
            self.add(q)

    def rigid(self, label: str, xyz: np.ndarray, target: np.ndarray | None, after: int) -> bool:
        """Place a free rigid element one step on; False (caller falls back to a coil) when it would strand
        the chain too far from its next anchor."""
        p = self.points[-1] if self.points else np.zeros(3)
        for _ in range(8):
            start = p + STEP * self._direction(p, label, target, after + len(xyz) + 1) if self.points else p
            placed = xyz + start
            if target is None or _norm(target - placed[-1]) <= 0.92 * STEP * (after + 1):
                self.add(placed)
                return True
        return False


def _coordinates(rng, segments: list[tuple]) -> np.ndarray:
    anchors = _membrane_elements(segments)
    tracer = _Tracer(rng, membrane=bool(anchors))
    sizes = [s[1] for s in segments]
    for i, (label, n, shape, _) in enumerate(segments):
        # The next membrane anchor and how many residues lie between the end of this segment and it.
        nxt = next((j for j in anchors if j > i), None)
        target = anchors[nxt][0] if nxt is not None else None
        after = sum(sizes[i + 1 : nxt]) if nxt is not None else 0
        if i in anchors:
            tracer.add(anchors[i])
            if nxt is not None:
                # Pull the next anchor towards this one when the residues between cannot span the gap.
                gap = anchors[nxt][0] - anchors[i][-1]
                reach = 0.85 * STEP * (after + 1)
                if _norm(gap) > reach:
                    anchors[nxt] = anchors[nxt] - gap * (1 - reach / _norm(gap))
            continue
        axis = _unit(rng.normal(size=3))
        if shape == "helix" and n > 1:
            if tracer.rigid(label, _helix(n, axis, rng.uniform(0, 2 * np.pi)), target, after):
                continue
        elif shape == "strand" and n > 1:
            if tracer.rigid(label, _strand(n, axis, _unit(rng.normal(size=3))), target, after):
                continue
        tracer.coil(label, n, target, after)
    return np.asarray(tracer.points, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- proteins


def check_mix(mix: dict[str, float], where: str = "synthetic mix") -> dict[str, float]:
    """A type mix as fractions summing to 1 (the values are relative); unknown types or shares <= 0 are errors."""
    unknown = sorted(set(mix) - set(PROTEIN_TYPES))
    if unknown or not mix or any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 for v in mix.values()):
        raise ValueError(f"{where}: expected shares > 0 for types among {', '.join(PROTEIN_TYPES)}, got {mix!r}")
    total = sum(mix.values())
    return {t: mix[t] / total for t in PROTEIN_TYPES if t in mix}


def allocate_types(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[str]:
    """Protein types for n proteins in DeepTMHMM proportions, or in `mix` (largest remainder, at least one of each
    type when n allows), in a seeded random order."""
    fractions = check_mix(mix) if mix else TYPE_FRACTIONS
    quotas = {t: n * f for t, f in fractions.items()}
    counts = {t: int(q) for t, q in quotas.items()}
    for t in sorted(quotas, key=lambda t: quotas[t] - counts[t], reverse=True)[: n - sum(counts.values())]:
        counts[t] += 1
    if n >= len(fractions):
        for t in fractions:
            if counts[t] == 0:  # take one from the largest class
                counts[max(counts, key=counts.get)] -= 1
                counts[t] = 1
    types = [t for t in PROTEIN_TYPES if t in counts for _ in range(counts[t])]
    np.random.default_rng([seed, 1 << 30]).shuffle(types)
    return types


def assign_folds(types: list[str], seed: int = 0) -> list[str]:
    """train/val/test 70/15/15 within each type, deterministic for a seed."""
    folds = [""] * len(types)
    rng = np.random.default_rng([seed, 1 << 31])
    for t in PROTEIN_TYPES:
        members = [i for i, x in enumerate(types) if x == t]
        rng.shuffle(members)
        num_train = int(round(len(members) * FOLD_FRACTIONS[0][1]))
        num_val = int(round(len(members) * FOLD_FRACTIONS[1][1]))
        for rank, i in enumerate(members):
            folds[i] = "train" if rank < num_train else "val" if rank < num_train + num_val else "test"
    return folds


def generate_protein(index: int, protein_type: str, seed: int = 0, fold: str = "") -> tuple[ProteinRecord, np.ndarray]:
    """One synthetic protein (record, CA coordinates [L, 3] in Angstrom), a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    length = int(np.clip(round(rng.lognormal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA)), MIN_LENGTH, MAX_LENGTH))
    segments = _layout(rng, protein_type, length)
    labels = "".join(label * size for label, size, _, _ in segments)
    sequence = protein_sequence(rng, segments)
    ca = _coordinates(rng, segments)
    assert len(sequence) == len(labels) == len(ca) and label_type(labels) == protein_type, (index, protein_type)
    record = ProteinRecord(id=f"SYN{index:06d}", sequence=sequence, labels=labels, type=protein_type, fold=fold,
                           source=f"synthetic:seed={seed}:{index}")
    return record, ca


def generate_proteins(n: int, seed: int = 0) -> list[tuple[ProteinRecord, np.ndarray]]:
    """n synthetic proteins with their C-alpha traces; identical for the same (n, seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    types = allocate_types(n, seed)
    folds = assign_folds(types, seed)
    return [generate_protein(i, t, seed, f) for i, (t, f) in enumerate(zip(types, folds))]
