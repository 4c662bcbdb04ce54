"""Which units a skeleton keeps: per layer, the top-scoring FFN neurons (and attention heads), as many as an
allocation rule gives each layer. (Scoring them: skeleton.attribution; cutting the rest out: skeleton.prune.)

How many units each layer keeps is an allocation rule (ALLOCATIONS): "uniform" (the same width everywhere),
"global" (one ranking over all layers after scaling each layer's scores by its mean) or "per_layer" (budgets
proportional to each layer's attribution mass). FFN widths are multiples of 8, at least 8; heads at least 1.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from skeleton.registry import Registry


def check_rate(rate: float, name: str = "pruning rate", unit: str = "FFN neurons") -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}; e.g. 0.65 removes 65% of {unit}")
    return float(rate)


def check_head_rate(rate: float) -> float:
    return check_rate(rate, "head pruning rate", "attention heads (at least one is kept per layer)")


def kept_width(width: int, rate: float, multiple: int = 8) -> int:
    """(1 - rate) * width rounded to a multiple of 8 (kernel-friendly), at least 8, at most width."""
    keep = round((1.0 - check_rate(rate)) * width / multiple) * multiple
    return min(width, max(multiple, keep))


# --- How many units each layer keeps -------------------------------------------------------------------------
# A rule maps (per-layer scores, rate, multiple) to per-layer kept counts: multiples of `multiple`, at least
# `multiple`, at most the layer's width (8 for FFN neurons: kernel-friendly widths; 1 for heads).
Allocation = Callable[[list[torch.Tensor], float, int], list[int]]
ALLOCATIONS: Registry[Allocation] = Registry("allocation rule")


def round_counts(raw: list[float], widths: list[int], target: int, multiple: int) -> list[int]:
    """Round real per-layer counts to multiples of `multiple` in [multiple, width], summing as close to `target`
    as the bounds allow (largest remainder: the layers furthest below their raw count get the spare units)."""
    caps = [max(1, w // multiple) for w in widths]
    want = [r / multiple for r in raw]
    units = [min(c, max(1, math.floor(x))) for x, c in zip(want, caps)]
    goal = min(sum(caps), max(len(caps), round(target / multiple)))
    while sum(units) < goal:
        i = max((i for i in range(len(units)) if units[i] < caps[i]), key=lambda i: want[i] - units[i])
        units[i] += 1
    while sum(units) > goal:
        i = min((i for i in range(len(units)) if units[i] > 1), key=lambda i: want[i] - units[i])
        units[i] -= 1
    return [min(w, u * multiple) for u, w in zip(units, widths)]


def _target(scores: list[torch.Tensor], rate: float) -> int:
    return round((1.0 - rate) * sum(len(s) for s in scores))


@ALLOCATIONS.register("uniform")
def uniform_counts(scores: list[torch.Tensor], rate: float, multiple: int = 8) -> list[int]:
    """(1 - rate) of every layer: the same kept width everywhere (when the layers are equally wide)."""
    return [kept_width(len(s), rate, multiple) for s in scores]


@ALLOCATIONS.register("global")
def global_counts(scores: list[torch.Tensor], rate: float, multiple: int = 8) -> list[int]:
    """One ranking over all layers' units, each layer's scores divided by their mean |score| first.

    Raw attribution mass falls several-fold from the first to the last layer, so a raw global ranking would
    strip the late layers; after the scaling a unit competes by how far it stands out within its own layer, and
    layers whose scores are concentrated on few units give up more of the rest. Measured on MiniLM / Rotten
    Tomatoes (grad_x_act, mass falls 4.7x from layer 0 to 5; 80% pruned, no re-tune, 1,275 validation examples):
    raw ranking keeps [808, 496, 304, 152, 64, 16] neurons, 72.2% accuracy; scaled [224, ..., 440], 75.4%;
    uniform 74.2%; per_layer 70.8%; full model 77.8%."""
    if rate == 0.0:
        return [len(s) for s in scores]
    scaled = torch.cat([s.double() / s.double().abs().mean().clamp(min=1e-30) for s in scores])
    layer = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    top = torch.topk(scaled, _target(scores, rate)).indices
    raw = torch.bincount(layer[top], minlength=len(scores)).tolist()
    return round_counts(raw, [len(s) for s in scores], _target(scores, rate), multiple)


@ALLOCATIONS.register("per_layer")
def per_layer_counts(scores: list[torch.Tensor], rate: float, multiple: int = 8) -> list[int]:
    """Each layer's budget proportional to its total attribution mass (negative scores count as 0); a layer
    that would get more than its width keeps everything and its excess goes to the others in proportion."""
    if rate == 0.0:
        return [len(s) for s in scores]
    widths = [len(s) for s in scores]
    mass = [float(s.double().clamp(min=0).sum()) for s in scores]
    if sum(mass) <= 0:
        mass = [float(w) for w in widths]
    raw = [0.0] * len(scores)
    free, budget = set(range(len(scores))), float(_target(scores, rate))
    while free:  # water-filling: cap the layers that overflow, share what they leave among the rest
        share = budget / max(sum(mass[i] for i in free), 1e-30)
        full = {i for i in free if mass[i] * share >= widths[i]}
        if not full:
            for i in free:
                raw[i] = mass[i] * share
            break
        for i in full:
            raw[i] = float(widths[i])
            budget -= widths[i]
        free -= full
    return round_counts(raw, widths, _target(scores, rate), multiple)


def check_allocation(name: str) -> Allocation:
    """The allocation rule registered as `name`; an unknown name raises KeyError listing the known ones."""
    return ALLOCATIONS[name]


def allocate(scores: list[torch.Tensor], rate: float, allocation: str = "uniform", multiple: int = 8) -> list[int]:
    """Per-layer kept counts under a registered allocation rule; an unknown rule names the known ones."""
    return ALLOCATIONS[allocation](scores, check_rate(rate), multiple)


def select(scores: list[torch.Tensor], rate: float, allocation: str = "uniform") -> list[torch.Tensor]:
    """Per layer, the sorted indices of the top-scoring neurons; how many per layer is the allocation rule's
    ("uniform": the same kept width in every layer)."""
    return keep_top(scores, allocate(scores, rate, allocation))


def select_heads(scores: list[torch.Tensor], rate: float, allocation: str = "uniform") -> list[torch.Tensor]:
    """Per layer, the sorted indices of the top-scoring attention heads; at least one per layer."""
    return keep_top(scores, ALLOCATIONS[allocation](scores, check_head_rate(rate), 1))


def keep_top(scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Per layer, the sorted indices of its `count` top-scoring units."""
    return [torch.sort(torch.topk(s, k).indices).values for s, k in zip(scores, counts)]
