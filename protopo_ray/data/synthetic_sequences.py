"""The synthetic proteins' sequences: the signals real sequences carry, at a realistic noise level.

`synthetic` lays a protein out as segments (label, length, shape, composition); this module draws its residues.
What a sequence-only predictor reads off real proteins (TMHMM, SignalP, barrel predictors), each kept here:

- membrane helices (17-25 residues, from the layout) of strongly hydrophobic composition, with aromatic belts
  (W, Y, F) at both membrane interfaces;
- the positive-inside rule: cytoplasmic loops enriched in K/R, most of all in the residues next to a helix;
- signal peptides' n/h/c regions: a positive n-region, a hydrophobic h-region of 7-15, and a c-region of small
  and polar residues usually ending in A-x-A before the cleavage site (often, not always, as in real ones);
- barrel strands whose residues alternate between the lipid-facing (hydrophobic, aromatic) and lumen-facing
  (polar) sides, with aromatic girdles at the strand ends, glycine/asparagine-rich periplasmic turns;
- soluble regions no more hydrophobic than real soluble proteins: amphipathic helices and soluble strands
  draw their buried faces from a core composition, milder than a membrane helix.

Noise is realistic, not zero: 8 % of residues come from the background whatever their region, and the helix and
strand compositions overlap. `tools/synthetic_realism.py` compares these figures with DeepTMHMM's labels
(docs/benchmarks.md, "Inputs users have").
"""

from __future__ import annotations

import numpy as np

from protopo_ray.data.alphabet import AMINO_ACIDS

#: Bumped whenever the sequences (or layouts) a seed gives change: embedded sets made by another version are
#: made again (data/build.ensure_data reads it from the manifest's generator record).
GENERATOR_VERSION = 2

NOISE = 0.08  # fraction of residues replaced by a background draw, whatever their region
FLANK = 6  # residues of a cytoplasmic loop next to a helix with the strongest K/R enrichment

# Relative amino-acid weights per region, in AMINO_ACIDS order "ACDEFGHIKLMNPQRSTVWY".
_BACKGROUND = [8.3, 1.4, 5.5, 6.7, 3.9, 7.1, 2.3, 5.9, 5.8, 9.7, 2.4, 4.1, 4.7, 3.9, 5.5, 6.6, 5.3, 6.9, 1.1, 2.9]


def _weights(base=None, **scale: float) -> np.ndarray:
    w = np.array(base if base is not None else _BACKGROUND, dtype=float)
    for aa, factor in scale.items():
        w[AMINO_ACIDS.index(aa)] *= factor
    return w / w.sum()


COMPOSITIONS = {
    "background": _weights(),
    # strongly hydrophobic: L I V F A dominate, G S T (common in real helices, often at packing faces) less so
    "tm_helix": _weights([10, 2, 0.3, 0.3, 9, 4, 0.5, 12, 0.5, 18, 4, 0.5, 0.5, 0.5, 0.5, 3, 3, 12, 3, 3]),
    "tm_belt": _weights(W=8, Y=6, F=2, K=0.8, R=0.8, D=0.2, E=0.2),  # helix ends at the interfaces
    # a soluble protein's buried face: hydrophobic, but far from a membrane helix (real soluble regions: ~1/3
    # of A I L M F V W against ~2/3 in membrane helices)
    "core": _weights(L=2.0, I=1.8, V=1.8, F=1.5, A=1.2, M=1.3, D=0.5, E=0.6, K=0.6, R=0.7, N=0.6, Q=0.7, P=0.2),
    "inside": _weights(K=2.0, R=2.0, D=0.8, E=0.8),  # positive-inside rule
    "inside_flank": _weights(K=3.5, R=3.5, D=0.5, E=0.5, H=1.5),  # ... strongest next to the helices
    "outside": _weights(K=0.6, R=0.6, D=1.2, E=1.2, N=1.3, S=1.2, T=1.2, G=1.2),
    "sp_n": _weights(K=6, R=6, D=0.1, E=0.1),
    "sp_h": _weights([12, 2, 0.1, 0.1, 5, 3, 0.2, 6, 0.1, 20, 3, 0.1, 1, 0.3, 0.1, 2, 2, 8, 1.5, 0.5]),
    "sp_c": _weights(A=3, S=2.5, G=2, T=2, Q=1.5, P=1.5, L=0.3, I=0.3, V=0.5, K=0.3, R=0.3),
    "amph_polar": _weights(E=2.5, K=2.5, Q=2, R=1.5, A=1.5, D=1.2, L=0.6, I=0.5, V=0.5, F=0.4, G=0.5, P=0.1),
    "strand_polar": _weights(S=2, T=2.5, N=1.5, Q=1.5, Y=1.5, G=1.2, K=1.2, R=1.2, D=0.8, E=0.8, L=0.4),
    # a barrel strand's lipid-facing side: aliphatic and aromatic (real ones: V L F Y A G I W)
    "strand_apolar": _weights([5, 1, 0.2, 0.2, 9, 3, 0.5, 8, 0.3, 12, 2, 0.3, 0.3, 0.3, 0.3, 2, 3, 12, 4, 10]),
    "peri_turn": _weights(G=3, N=2.5, D=2.5, P=2, S=1.5, K=1.5),
    # a barrel's long extracellular loops: flexible and polar, nothing like the strands beside them
    "barrel_loop": _weights(G=1.8, N=1.8, D=1.8, S=1.5, T=1.5, E=1.3, Q=1.3, P=1.3, K=0.8, L=0.5, I=0.4, V=0.4,
                            F=0.4, A=0.7, M=0.5, W=0.4, Y=0.8),
    "girdle": _weights(Y=12, W=10, F=4),
}
_CUM = {name: np.cumsum(w) for name, w in COMPOSITIONS.items()}
_AA = np.array(list(AMINO_ACIDS))


def draw(rng, composition: str, size: int) -> np.ndarray:
    """`size` residues drawn from a named composition."""
    return _AA[np.searchsorted(_CUM[composition], rng.random(size) * _CUM[composition][-1])]


def segment_sequence(rng, length: int, composition: str) -> np.ndarray:
    """The residues of one segment."""
    if composition == "amphipathic":  # heptad a/d (and some e) on the buried face, the rest polar helix formers
        face = np.isin(np.arange(length) % 7, (0, 3)) | ((np.arange(length) % 7 == 4) & (rng.random(length) < 0.3))
        return np.where(face, draw(rng, "core", length), draw(rng, "amph_polar", length))
    if composition == "soluble_strand":  # alternating buried / exposed, a protein core on one side
        buried = np.arange(length) % 2 == 0
        return np.where(buried, draw(rng, "core", length), draw(rng, "strand_polar", length))
    if composition == "tm_strand":
        # Even positions face the lipid and match the outward zig-zag in `synthetic._strand`.
        apolar = np.arange(length) % 2 == 0
        seq = np.where(apolar, draw(rng, "strand_apolar", length), draw(rng, "strand_polar", length))
        seq[[0, -1]] = draw(rng, "girdle", 2)  # aromatic girdles at the membrane interfaces
        return seq
    if composition == "tm_helix":
        seq = draw(rng, "tm_helix", length)
        belt = rng.random(length) < 0.35
        belt[3:-3] = False  # the helix ends sit in the interface
        seq[belt] = draw(rng, "tm_belt", int(belt.sum()))
        return seq
    return draw(rng, composition, length)


def protein_sequence(rng, segments: list[tuple]) -> str:
    """The sequence of a laid-out protein: its segments' residues, the positive-inside flanks, the signal
    peptide's cleavage motif, background noise, and M first."""
    seq = np.concatenate([segment_sequence(rng, size, comp) for _, size, _, comp in segments])
    labels = np.array(list("".join(label * size for label, size, _, _ in segments)))
    ends = np.cumsum([s[1] for s in segments])
    starts = ends - np.array([s[1] for s in segments])
    for (_, _, shape, comp), start, end in zip(segments, starts, ends):
        if shape == "tm_helix":  # cytoplasmic residues next to a helix: the strongest K/R enrichment
            for lo, hi in ((max(start - FLANK, 0), start), (end, min(end + FLANK, len(seq)))):
                near = np.arange(lo, hi)[labels[lo:hi] == "I"]
                seq[near] = draw(rng, "inside_flank", near.size)
        if comp == "sp_c" and end >= 3 and rng.random() < 0.7:  # A-x-A before the cleavage site, usually
            seq[end - 3], seq[end - 1] = "A", rng.choice(["A", "A", "G", "S"])
    noisy = rng.random(len(seq)) < NOISE
    seq[noisy] = draw(rng, "background", int(noisy.sum()))
    seq[0] = "M"
    return "".join(seq)
