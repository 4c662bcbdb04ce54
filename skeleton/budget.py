"""A joint budget: given a target speed-up, how many FFN neurons and attention heads each layer keeps.

The target is read as multiply-adds: the skeleton may do at most 1/target of the full model's MACs (the
arithmetic bound of its speed-up, which measured CPU speed-ups reach, see skeleton.benchmark). Every unit costs
MACs per position (a neuron: its rows of the up projections and its column of the down projection; a head: its
q/k/v rows, its output columns and its share of the attention scores and weighted values). Units are removed
greedily in order of score per MAC until the budget is met: the cheapest importance goes first, whether it sits
in an FFN or in attention. Scores are divided by their layer's mean FFN neuron score first, as in the "global"
allocation rule, since raw attribution mass falls several-fold with depth.
"""
from __future__ import annotations

import torch

from skeleton.backbones import family_of
from skeleton.benchmark import count_macs
from skeleton.model import PromptClassifier


def plan(model: PromptClassifier, ffn_scores: list[torch.Tensor], head_scores: list[torch.Tensor],
         target_speedup: float, text_len: int, multiple: int = 8) -> tuple[list[int], list[int]]:
    """(FFN neurons kept per layer, heads kept per layer) so that MACs(skeleton) <= MACs(full) / target_speedup
    on texts of `text_len` tokens. Without head scores only FFN neurons are cut (head counts are then the full
    ones). Keeps at least `multiple` neurons (widths stay multiples of it) and one head per layer."""
    if not target_speedup > 1.0:
        raise ValueError(f"target speed-up must be above 1, got {target_speedup!r}; e.g. 2.0 for twice as fast")
    backbone = model.backbone
    family = family_of(backbone)
    seq = text_len + model.config.prompt_length
    blocks = family.ffn_blocks(backbone)
    attention = family.attention_blocks(backbone) if head_scores else []
    neuron_cost = [seq * (sum(up.in_features for up in b.up) + b.down.out_features) for b in blocks]
    head_cost = [seq * a.head_dim * (sum(p.in_features for p in a.qkv) + a.out.out_features) + 2 * seq * seq * a.head_dim
                 for a in attention]
    total = count_macs(model, 1, text_len).total
    to_remove = total - total / target_speedup

    # Removal candidates (score per MAC, layer, kind); the top `multiple` neurons and the top head always stay.
    candidates = []
    for layer, scores in enumerate(ffn_scores):
        scale = float(scores.double().abs().mean().clamp(min=1e-30))
        for s in torch.sort(scores.double()).values[: len(scores) - multiple].tolist():
            candidates.append((s / scale / neuron_cost[layer], layer, "ffn"))
        if attention:
            for s in torch.sort(head_scores[layer].double()).values[:-1].tolist():
                candidates.append((s / scale / head_cost[layer], layer, "head"))
    candidates.sort()
    removed = {"ffn": [0] * len(blocks), "head": [0] * len(attention)}
    saved = 0.0
    for _, layer, kind in candidates:
        if saved >= to_remove:
            break
        removed[kind][layer] += 1
        saved += neuron_cost[layer] if kind == "ffn" else head_cost[layer]
    if saved < to_remove:
        raise ValueError(f"a {target_speedup}x target is out of reach: cutting every FFN neuron and head that may go "
                         f"saves {saved / total:.0%} of the multiply-adds")
    # Round kept widths down to multiples (cutting a little more, so the target still holds).
    ffn = [max(multiple, (b.down.in_features - r) // multiple * multiple) for b, r in zip(blocks, removed["ffn"])]
    heads = [a.num_heads - r for a, r in zip(attention, removed["head"])]
    return ffn, heads
