"""Linear-chain CRF over a topology grammar's states, with emissions tied to the six labels.

A path's score is start(s_0) + sum_t emission[t, label(s_t)] + sum_t transition(s_(t-1) -> s_t) + end(s_(T-1)).
Transitions exist only along the grammar's edges (a move it does not allow is never represented, so its score
is -inf); their scores are learned (`CRF`) or fixed with a penalty on entering a membrane segment
(`CRF.fixed`, the decode-only mode over a softmax head).

Kernels are plain torch, batched over right-padded, length-bucketed batches and exact for each sequence's own
length: a padded step leaves that sequence's forward variables as they are. Each state has <= 3 predecessors
(`grammar.py`), so a step gathers [B, S, K] scores instead of multiplying by an S x S matrix. Forward in log
space; the NLL of the true labels is log Z - log Z(paths that emit the true labels), the second term being the
same forward pass with the emissions of the other labels masked, so the true path needs no explicit mapping
and any grammar ambiguity (globular I vs alpha-world I) is summed over exactly. Viterbi keeps the max-product
variables only and backtracks in numpy, recomputing each step's argmax for the state the path is in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from protopo_ray.data.alphabet import NUM_LABELS
from protopo_ray.model.grammar import Decoding, Grammar

#: Score of what cannot happen. Finite, because logsumexp over all -inf has a NaN gradient; exp(-1e4) is 0 in fp32.
NEG = -1e4
#: Smallest step normaliser of the scaled forward pass; below it no path is left (the labels are rejected).
TINY = 1e-30


class CRF(nn.Module):
    """Transition, start and end scores over `grammar`; `nll` trains it, `decode` is batched Viterbi."""

    def __init__(self, grammar: Grammar, learn: bool = True) -> None:
        super().__init__()
        self.grammar = grammar
        num_states = grammar.num_states
        preds: list[list[tuple[int, int]]] = [[] for _ in range(num_states)]
        for e, (a, b) in enumerate(grammar.edges):
            preds[b].append((a, e))
        k = max(len(p) for p in preds)
        pred = np.zeros((num_states, k), dtype=np.int64)
        pred_edge = np.full((num_states, k), len(grammar.edges), dtype=np.int64)  # pad -> the NEG slot
        for s, plist in enumerate(preds):
            for j, (a, e) in enumerate(plist):
                pred[s, j], pred_edge[s, j] = a, e
        self.pred_np = pred
        self.register_buffer("state_labels", torch.tensor(grammar.labels, dtype=torch.long), persistent=False)
        self.register_buffer("pred", torch.from_numpy(pred), persistent=False)
        self.register_buffer("pred_edge", torch.from_numpy(pred_edge), persistent=False)
        self.register_buffer("starts", torch.tensor(grammar.starts, dtype=torch.long), persistent=False)
        self.register_buffer("ends", torch.tensor(grammar.ends, dtype=torch.long), persistent=False)
        # Learned scores start from the grammar's segment-length log-priors (0 where it has none).
        initial = {"edge_scores": grammar.edge_priors or (0.0,) * len(grammar.edges),
                   "start_scores": grammar.start_priors or (0.0,) * len(grammar.starts),
                   "end_scores": (0.0,) * len(grammar.ends)}
        for name, values in initial.items():
            if learn:
                setattr(self, name, nn.Parameter(torch.tensor(values, dtype=torch.float32)))
            else:
                # fixed scores are derived from the config, not saved: a decode-only model loads any checkpoint
                self.register_buffer(name, torch.zeros(len(values)), persistent=False)

    @classmethod
    def fixed(cls, grammar: Grammar, decoding: Decoding | None = None) -> CRF:
        """Fixed transitions: `duration_weight` x the grammar's segment-length log-priors on the moves that commit
        to a length, -entry_penalty on entering an M or B segment (-strand_penalty for B when set), +beta_offset on
        starting a beta-world path, NEG (forbidden) on entering a helix-helix loop shorter than `min_loop`, 0 on
        every other allowed move."""
        decoding = decoding or Decoding()
        crf = cls(grammar, learn=False)

        def scores(labels: tuple[str, ...], priors: tuple[float, ...], worlds: tuple[str, ...]) -> Tensor:
            priors, worlds = priors or (0.0,) * len(labels), worlds or ("",) * len(labels)
            return torch.tensor([decoding.duration_weight * p - decoding.entry_cost(c)
                                 + (decoding.beta_offset if w == "beta" else 0.0)
                                 for c, p, w in zip(labels, priors, worlds)])

        edge_scores = scores(grammar.edge_enters, grammar.edge_priors, ())
        if decoding.min_loop > 1 and grammar.edge_helix_loops:
            loops = torch.tensor(grammar.edge_helix_loops)
            edge_scores[(loops > 0) & (loops < decoding.min_loop)] = NEG
        with torch.no_grad():
            crf.edge_scores.copy_(edge_scores)
            crf.start_scores.copy_(scores(grammar.start_enters, grammar.start_priors, grammar.start_worlds))
        return crf

    def _scores(self) -> tuple[Tensor, Tensor, Tensor]:
        """[S, K] predecessor transition scores, [S] start and [S] end scores (NEG where not allowed)."""
        neg = self.edge_scores.new_full((1,), NEG)
        trans = torch.cat([self.edge_scores, neg])[self.pred_edge]
        start = self.edge_scores.new_full((self.grammar.num_states,), NEG).index_put((self.starts,), self.start_scores)
        end = self.edge_scores.new_full((self.grammar.num_states,), NEG).index_put((self.ends,), self.end_scores)
        return trans, start, end

    def _viterbi_run(self, emissions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Max-product over label emissions [B, T, L]: final scores [B, S], the max-product variables [T, B, S]
        and the [S, K] transition scores. No backpointers: `amax` over the <= 3 predecessors is ~10x cheaper
        on CPU than `max` with its indices (measured 10 vs 110 us a step at B = 32), and the backtrace recomputes
        the argmax for the one state each sequence is in, from the same float sums."""
        trans, start, end = self._scores()
        trans_ks = trans.T.contiguous()  # [K, S]: predecessors on dim 1 of the candidates, states contiguous
        pred_ks = self.pred.T.contiguous().flatten()
        state_em = emissions.float().transpose(0, 1)[..., self.state_labels]  # [T, B, S]
        batch, num_states = state_em.shape[1:]
        alphas = torch.empty_like(state_em)
        alphas[0] = start + state_em[0]
        for t in range(1, len(state_em)):
            cand = alphas[t - 1].index_select(1, pred_ks).view(batch, -1, num_states) + trans_ks  # [B, K, S]
            torch.add(cand.amax(dim=1), state_em[t], out=alphas[t])
        # steps past a sequence's end compute on regardless; its own last step is picked out here
        final = alphas[lengths - 1, torch.arange(batch, device=lengths.device)]
        return final + end, alphas, trans

    def log_partition(self, emissions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(log Z [B], possible [B] bool) of label emissions [B, T, NUM_LABELS] (right-padded; `lengths` [B]).

        The forward algorithm in probability space with one normalisation per step (the scaled forward
        algorithm): a step is a gather, a product and two sums, no exp and no masking, which measured several
        times faster on CPU than logsumexp steps. Emissions are shifted by their per-residue maximum and
        exponentiated once for the whole batch; the shifts and the step normalisers are added back in log space,
        so log Z is exact. Steps past a sequence's end compute on and are never read: each sequence's forward
        variables and normalisers are picked at its own last step. `possible` is False where some step left no
        path with probability mass (emissions or moves of score NEG).
        """
        trans, start, end = self._scores()
        top = trans.max().detach()
        weights = (trans.T - top).exp().contiguous()  # [K, S]
        pred_ks = self.pred.T.contiguous().flatten()
        emissions = emissions.float()
        shift = emissions.amax(dim=-1).detach()  # [B, T]
        state_p = (emissions - shift[..., None]).exp().transpose(0, 1)[..., self.state_labels]  # [T, B, S]
        batch, num_states = state_p.shape[1:]
        # unbind once: indexing state_p[t] in the loop would make backward allocate a [T, B, S] zero tensor per step
        state_p = state_p.unbind(0)
        alpha = (start - start.max().detach()).exp() * state_p[0]
        norms = [alpha.sum(-1, keepdim=True).clamp_min(TINY)]
        alphas = [alpha / norms[0]]
        for t in range(1, len(state_p)):
            new = (alphas[-1].index_select(1, pred_ks).view(batch, -1, num_states) * weights).sum(1) * state_p[t]
            norms.append(new.sum(-1, keepdim=True).clamp_min(TINY))
            alphas.append(new / norms[-1])
        rows = torch.arange(batch, device=lengths.device)
        norm = torch.cat(norms, dim=-1)  # [B, T]
        steps = torch.arange(norm.size(1), device=lengths.device)[None, :] < lengths[:, None]
        log_norm = torch.where(steps, norm.log() + shift, 0.0).sum(-1)
        log_norm = log_norm + (lengths - 1) * top + start.max().detach()
        last = (torch.stack(alphas)[lengths - 1, rows] * (end - end.max().detach()).exp()).sum(-1).clamp_min(TINY)
        possible = ((norm.detach() > TINY) | ~steps).all(-1) & (last.detach() > TINY)
        return log_norm + last.log() + end.max().detach(), possible

    def nll(self, emissions: Tensor, lengths: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(NLL [B], accepted [B] bool) of true `labels` [B, T] (padding any value; label < 0 counts as unknown).

        A sequence the grammar cannot emit gets NLL 0 and accepted False, so one odd label string never
        turns a batch's loss into 1e4. Both forward passes run as one batch of 2B.
        """
        masked = torch.where(labels[..., None] == torch.arange(NUM_LABELS, device=labels.device), 0.0, NEG)
        masked = torch.where(labels[..., None] < 0, 0.0, masked)
        both = torch.cat([emissions.float(), emissions.float() + masked])
        log_z, possible = self.log_partition(both, torch.cat([lengths, lengths]))
        full, true = log_z.chunk(2)
        accepted = possible.chunk(2)[1]
        return torch.where(accepted, full - true, torch.zeros_like(full)), accepted

    @torch.no_grad()
    def decode(self, emissions: Tensor, lengths: Tensor) -> Tensor:
        """Viterbi label indices [B, T] (padding positions 0) for emissions [B, T, NUM_LABELS]."""
        batch, steps = emissions.shape[:2]
        if batch == 0 or steps == 0:
            return torch.zeros(batch, steps, dtype=torch.long, device=emissions.device)
        final, alphas, trans = self._viterbi_run(emissions, lengths)
        cur = final.argmax(dim=-1).cpu().numpy()
        alphas, trans = alphas.cpu().numpy(), trans.detach().cpu().numpy()
        ends = lengths.cpu().numpy() - 1
        rows = np.arange(batch)
        states = np.zeros((batch, steps), dtype=np.int64)
        for t in range(steps - 1, -1, -1):
            active = t <= ends
            states[active, t] = cur[active]
            if t > 0:  # the predecessor the forward pass's max came from (first of equals)
                preds = self.pred_np[cur]  # [B, K]
                best = (alphas[t - 1][rows[:, None], preds] + trans[cur]).argmax(1)
                cur = np.where(active, preds[rows, best], cur)
        labels = np.asarray(self.grammar.labels)[states]
        labels[np.arange(steps)[None, :] > ends[:, None]] = 0
        return torch.from_numpy(labels).to(emissions.device)

    def marginals(self, emissions: Tensor, lengths: Tensor) -> Tensor:
        """Per-residue label posteriors [B, T, NUM_LABELS] (d log Z / d emissions; rows of padding are 0)."""
        with torch.enable_grad():
            em = emissions.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_partition(em, lengths)[0].sum(), em)
        return grad
