"""Multiply-adds (MACs) of one forward pass of a PromptClassifier, counted from the modules' actual shapes, so pruned
heads and per-layer FFN widths count as they are: the arithmetic bound on a skeleton's speed-up
(MACs of the full model / MACs of the skeleton) that skeleton.benchmark reports beside the measured one, and the
currency of skeleton.budget's joint budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from skeleton.model import PromptClassifier

QUERY_PROJECTIONS = ("query", "q_proj")  # BERT's and LLaMA's; one per attention layer
PER_EXAMPLE = ("pooler",)  # backbone modules applied to one position per example (BERT's pooler, on [CLS])


@dataclass(frozen=True)
class Macs:
    """Multiply-adds of one forward pass of a PromptClassifier. Element-wise work (norms, activations, softmax,
    pooling) and embedding look-ups are not counted."""

    projections: int  # every nn.Linear of the backbone: per position (the BERT pooler: per example)
    attention: int  # Q·Kᵀ and attention·V, from each layer's query width (heads × head_dim)
    head: int  # the task head, per example

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.head


def attention_widths(backbone: nn.Module) -> list[int]:
    """heads × head_dim of each attention layer's queries, read from its query projection (so pruned heads count)."""
    widths = [getattr(module, name).out_features for module in backbone.modules() for name in QUERY_PROJECTIONS
              if isinstance(getattr(module, name, None), nn.Linear)]
    layers = backbone.config.num_hidden_layers
    if len(widths) != layers:
        raise ValueError(f"found {len(widths)} query projections (modules named {' or '.join(QUERY_PROJECTIONS)}) "
                         f"in a {layers}-layer {type(backbone).__name__}: add its name to QUERY_PROJECTIONS")
    return widths


def count_macs(model: PromptClassifier, batch_size: int, text_len: int) -> Macs:
    """MACs of `model(input_ids, attention_mask)` on a (batch_size, text_len) batch without padding. The layers run
    text_len + P positions (P: the prompt's positions, 0 for a prefix), each attending to text_len + m keys."""
    seq = text_len + model.prompt_positions
    keys = text_len + model.config.prompt_length
    positions = batch_size * seq
    projections = 0
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Linear):
            rows = batch_size if name.split(".")[0] in PER_EXAMPLE else positions
            projections += rows * module.in_features * module.out_features
    # Scores and weighted values each cost `keys` MACs per query dimension and position. A causal model is counted
    # over the full rectangle too (dense kernels compute it, then mask); both sides of the ratio alike.
    attention = sum(2 * positions * keys * width for width in attention_widths(model.backbone))
    head = batch_size * model.head.in_features * model.head.out_features
    return Macs(projections, attention, head)
