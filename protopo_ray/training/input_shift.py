"""Inputs a predictor was not trained on: the one rule `predict` and evaluation apply before they trust its output.

A checkpoint records what its training proteins were (`ModelInputs.graph_sources`, e.g. {"structure": 400}, and
the embedding it was given). Proteins at hand whose graph kind the model has never seen (a FASTA's sequence-window
graphs for a model trained on structures only, or structure graphs for one trained on sequences) get predictions
from inputs outside everything it learnt from: measured in issue 27, the embedded default's winner fell from
overlap 0.92 on its structure graphs to 0.35 on the same proteins from FASTA, silently. A kind it saw only rarely
is a warning; one it never saw is `unseen`, which the caller refuses unless told to go on.

The rule reads counts only, so a model trained with structure dropout (training proteins also seen through their
sequence graphs, counted under "sequence") passes for both kinds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from protopo_ray.training.checkpoint import ModelInputs

#: A graph kind under this share of the training proteins is "rarely seen": a warning, never a refusal.
RARE_SHARE = 0.05

#: What the user can do, per graph kind the model lacks.
REMEDY = {
    "sequence": "give the proteins structures (--structures DIR with AlphaFold/PDB files), or predict with a model "
                "trained on sequence graphs too (structure dropout, or `prepare --labels` without structures)",
    "structure": "leave out --structures so the proteins get sequence-window graphs like its training proteins, or "
                 "predict with a model trained on structure graphs too",
}


@dataclass(frozen=True, kw_only=True)
class InputShift:
    """One kind of input the proteins at hand have and the model saw rarely or never."""

    kind: str
    """'graph:sequence', 'graph:structure', or 'embedding'."""
    num_proteins: int
    """Proteins at hand of that kind."""
    num_total: int
    """Proteins at hand."""
    trained: int
    """Training proteins of that kind (0: the model never saw one)."""
    trained_total: int
    message: str

    @property
    def unseen(self) -> bool:
        """No training protein of this kind: its predictions are outside everything the model learnt from."""
        return self.trained == 0


def find_input_shifts(inputs: ModelInputs, graph_sources: Iterable[str], embedding: dict | None = None,
                      where: str = "the checkpoint") -> list[InputShift]:
    """What differs between the model's training inputs (`inputs`) and the proteins at hand: the graph source of
    each protein ('structure' / 'sequence', as `ResidueGraph.graph_source` or a shard's column says) and the
    embedding spec their features were made with (None: none). Empty when they match."""
    at_hand = Counter(graph_sources)
    total = sum(at_hand.values())
    trained_total = sum(inputs.graph_sources.values())
    found = []
    for source, count in sorted(at_hand.items()):
        trained = int(inputs.graph_sources.get(source, 0))
        if count == 0 or trained_total == 0 or trained >= RARE_SHARE * trained_total:
            continue
        seen = ("never saw one" if trained == 0 else
                f"saw {trained} of {trained_total} training proteins ({trained / trained_total:.1%}) so built")
        message = (f"{count} of {total} protein(s) get {source} graphs, and {where} (trained on "
                   f"{_describe(inputs.graph_sources)}) {seen}: its predictions for them are "
                   f"{'not' if trained == 0 else 'barely'} supported by its training. What to do: "
                   f"{REMEDY.get(source, 'predict with a model trained on such inputs')}")
        found.append(InputShift(kind=f"graph:{source}", num_proteins=count, num_total=total, trained=trained,
                                trained_total=trained_total, message=message))
    trained_embedding = _embedding_key(inputs.embedding)
    if total and _embedding_key(embedding) != trained_embedding:
        message = (f"{total} protein(s) have {_describe_embedding(embedding)} features, and {where} was trained on "
                   f"{_describe_embedding(inputs.embedding)}: embed them as its training proteins were")
        found.append(InputShift(kind="embedding", num_proteins=total, num_total=total, trained=0,
                                trained_total=trained_total, message=message))
    return found


def _describe(sources: dict[str, int]) -> str:
    shown = [f"{count} {source}" for source, count in sorted(sources.items()) if count]
    return " + ".join(shown) + " graph(s)" if shown else "no recorded graphs"


def _embedding_key(spec: dict | None) -> tuple | None:
    """What makes two embeddings the same features (the weights' path may differ: --embed-weights)."""
    return None if not spec else (spec.get("model"), int(spec.get("layer", -1)), int(spec.get("dim", 0)))


def _describe_embedding(spec: dict | None) -> str:
    return "no embedding" if not spec else f"{spec.get('model')} (layer {spec.get('layer')}, dim {spec.get('dim')})"


def refusal(shifts: list[InputShift]) -> str:
    """The error for the unseen shifts among `shifts` ('' when there is none), naming the flag that goes on."""
    unseen = [s for s in shifts if s.unseen]
    if not unseen:
        return ""
    return "; ".join(s.message for s in unseen) + ". To predict anyway, pass --allow-input-shift"


def expected_shifts(inputs: ModelInputs, structures: bool, where: str = "the checkpoint") -> list[InputShift]:
    """The shifts known before any protein is read (a streamed run): without structures every protein gets a
    sequence-window graph; with them, those with a structure file get structure graphs. Counts are -1 (not yet
    known); the run reports the real ones (`find_input_shifts`) when it ends."""
    kinds = ["structure"] if structures else ["sequence"]
    found = []
    for source in kinds:
        if inputs.graph_sources.get(source, 0):
            continue
        who = "every protein gets" if source == "sequence" else "the proteins with a structure file get"
        found.append(InputShift(
            kind=f"graph:{source}", num_proteins=-1, num_total=-1, trained=0,
            trained_total=sum(inputs.graph_sources.values()),
            message=f"{who} {source} graphs, and {where} (trained on {_describe(inputs.graph_sources)}) never saw "
                    f"one: its predictions for them are not supported by its training. What to do: "
                    f"{REMEDY.get(source, 'predict with a model trained on such inputs')}"))
    return found
