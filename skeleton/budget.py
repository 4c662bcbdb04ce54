"""A joint budget: given a target speed-up, how many FFN neurons and attention heads each layer keeps.

The target is read as multiply-adds: the skeleton may do at most 1/target of the full model's MACs (the
arithmetic bound of its speed-up, skeleton.macs, which measured CPU speed-ups reach, see skeleton.benchmark).

Attribution scores rank units within their kind, but they do not price a head against FFN neurons. A first
version removed units across both kinds by score per multiply-add: for 2x on MiniLM / rotten_tomatoes it cut
82% of the heads and lost 4.7 points over 3 seeds, against 2.4 for cutting the FFN alone. So the mix is chosen by
measurement. Each candidate cuts one share of the heads (HEAD_SHARES), then just enough FFN neurons to meet the
target, both picked by score under the allocation rule. `judge` scores every candidate and the lowest score wins.
In the sweep, the judge is the validation loss of the cut model before re-tuning (`loss_after_cutting`).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from skeleton.backbones import family_of
from skeleton.macs import count_macs
from skeleton.model import PromptClassifier
from skeleton.prune import slice_ffn, slice_heads
from skeleton.selection import ALLOCATIONS, allocate, keep_top
from skeleton.train import predict

log = logging.getLogger("skeleton")
HEAD_SHARES = (0.0, 1 / 6, 1 / 3, 1 / 2)  # shares of each layer's heads a candidate cuts (MiniLM: 0, 2, 4, 6 of 12)
RATE_STEPS = 400  # FFN rates tried per candidate, from 0 up to the first that meets the target


@dataclass(frozen=True)
class Candidate:
    ffn: list[int]  # FFN neurons kept per layer
    heads: list[int]  # attention heads kept per layer; [] when heads are not cut
    macs: int  # of one example of `text_len` tokens plus the prompt

    def head_rate(self, head_scores: list[torch.Tensor]) -> float:
        return 1 - sum(self.heads) / sum(len(h) for h in head_scores) if self.heads else 0.0

    def rate(self, ffn_scores: list[torch.Tensor]) -> float:
        return 1 - sum(self.ffn) / sum(len(s) for s in ffn_scores)


def check_target_speedup(target_speedup: float) -> float:
    if not target_speedup > 1.0:
        raise ValueError(f"target speed-up must be above 1, got {target_speedup!r}; e.g. 2.0 for twice as fast")
    return float(target_speedup)


def candidates(model: PromptClassifier, ffn_scores: list[torch.Tensor], head_scores: list[torch.Tensor],
               target_speedup: float, text_len: int, allocation: str = "uniform") -> list[Candidate]:
    """Per head share, the least FFN cut that brings MACs(skeleton) to at most MACs(full) / target_speedup on texts
    of `text_len` tokens. Without head scores, one FFN-only candidate. Shares whose FFN cut cannot reach the
    target are left out; if none can, a ValueError says how far the deepest cut gets."""
    check_target_speedup(target_speedup)
    backbone = model.backbone
    family = family_of(backbone)
    seq = text_len + model.prompt_positions  # positions the layers run (a prefix adds keys only)
    keys = text_len + model.config.prompt_length
    blocks = family.ffn_blocks(backbone)
    attention = family.attention_blocks(backbone) if head_scores else []
    # MACs per unit and position: a neuron's rows of the up projections and its column of the down projection;
    # a head's q/k/v rows and output columns, plus its share of the attention scores and weighted values.
    neuron_cost = [seq * (sum(up.in_features for up in b.up) + b.down.out_features) for b in blocks]
    head_cost = [seq * a.head_dim * (sum(p.in_features for p in a.qkv) + a.out.out_features) + 2 * seq * keys * a.head_dim
                 for a in attention]
    total = count_macs(model, 1, text_len).total
    budget = total / target_speedup
    out, deepest = [], total
    for share in HEAD_SHARES if attention else (0.0,):
        heads = ALLOCATIONS[allocation](head_scores, share, 1) if attention else []
        if any(c.heads == heads for c in out):
            continue  # few heads per layer: two shares round to the same counts
        after_heads = total - sum((a.num_heads - k) * c for a, k, c in zip(attention, heads, head_cost))
        for step in range(RATE_STEPS):
            ffn = allocate(ffn_scores, step / RATE_STEPS, allocation)
            macs = after_heads - sum((b.down.in_features - k) * c for b, k, c in zip(blocks, ffn, neuron_cost))
            if macs <= budget:
                out.append(Candidate(ffn, heads, int(macs)))
                break
        deepest = min(deepest, macs)
    if not out:
        raise ValueError(f"a {target_speedup}x target is out of reach: the deepest cut tried (heads up to "
                         f"{max(HEAD_SHARES) if attention else 0:.0%}, nearly every FFN neuron) is "
                         f"{total / deepest:.2f}x in multiply-adds")
    return out


def plan(model: PromptClassifier, ffn_scores: list[torch.Tensor], head_scores: list[torch.Tensor],
         target_speedup: float, text_len: int, judge: Callable[[Candidate], float],
         allocation: str = "uniform") -> tuple[Candidate, list[dict]]:
    """The candidate (see `candidates`) with the lowest judge(candidate), and a record of every candidate tried
    (rate, head_rate, macs, score). A single candidate is taken without judging."""
    options = candidates(model, ffn_scores, head_scores, target_speedup, text_len, allocation)
    tried = []
    for c in options:
        score = judge(c) if len(options) > 1 else None
        tried.append({"rate": c.rate(ffn_scores), "head_rate": c.head_rate(head_scores), "macs": c.macs, "score": score})
        log.info("joint budget x%g: FFN rate %.3f, head rate %.3f: score %s", target_speedup, tried[-1]["rate"],
                 tried[-1]["head_rate"], "-" if score is None else f"{score:.4f}")
    best = 0 if len(options) == 1 else min(range(len(options)), key=lambda i: tried[i]["score"])
    return options[best], tried


def cut(model: PromptClassifier, ffn_scores: list[torch.Tensor], head_scores: list[torch.Tensor],
        candidate: Candidate) -> PromptClassifier:
    """A copy of `model` with the candidate's top-scoring heads and FFN neurons kept, the rest sliced out."""
    pruned = copy.deepcopy(model)
    if candidate.head_rate(head_scores) > 0:
        slice_heads(pruned.backbone, keep_top(head_scores, candidate.heads))
    device = next(pruned.parameters()).device  # index_select wants its indices where the weights are
    slice_ffn(pruned.backbone, [k.to(device) for k in keep_top(ffn_scores, candidate.ffn)])
    return pruned


def loss_after_cutting(model: PromptClassifier, ffn_scores: list[torch.Tensor], head_scores: list[torch.Tensor],
                       dataset, pad_id: int) -> Callable[[Candidate], float]:
    """A judge: the cross-entropy on `dataset` (validation) of the model cut as the candidate says, before any
    re-tuning. Lower is better: the damage re-tuning has to repair."""
    labels = torch.tensor(dataset["label"])

    def judge(candidate: Candidate) -> float:
        logits = predict(cut(model, ffn_scores, head_scores, candidate), dataset, pad_id)
        return torch.nn.functional.cross_entropy(logits, labels).item()

    return judge
