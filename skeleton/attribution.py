"""Task relevance of every FFN neuron: the activation entering each down projection, scored per method.

Each method returns one score tensor per layer, shape (intermediate_size,); higher means keep.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from skeleton.backbones import family_of
from skeleton.model import PromptClassifier
from skeleton.registry import Registry
from skeleton.train import batches

log = logging.getLogger("skeleton")

Scores = list[torch.Tensor]
METHODS: Registry[Callable[..., Scores]] = Registry("selection method")


def down_projections(model: PromptClassifier) -> list[torch.nn.Linear]:
    return [block.down for block in family_of(model.backbone).ffn_blocks(model.backbone)]


@contextlib.contextmanager
def capture_inputs(modules: list[torch.nn.Module]):
    """Record the input tensor of each module on every forward pass (the list is overwritten per pass)."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook(index):
        def save(_module, args):
            captured[index] = args[0]

        return save

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def gold_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)


def _accumulate(model: PromptClassifier, dataset, pad_id: int, batch_size: int, score_batch) -> Scores:
    """Sum `score_batch(acts, grads_or_None, token_mask, batch)` over batches, averaged per example."""
    downs = down_projections(model)
    totals = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    seen = 0
    model.eval()
    for i, batch in enumerate(batches(dataset, pad_id, batch_size)):
        with capture_inputs(downs) as acts:
            embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
            logits = model.head(model.features(embeds, mask))
        token_mask = mask.unsqueeze(-1).to(logits.dtype)  # (B, m+T, 1): padding does not count
        for total, layer_scores in zip(totals, score_batch(logits, acts, token_mask, batch)):
            total += layer_scores.double()
        seen += len(batch["labels"])
        log.info("attribution batch %d  examples %d/%d", i + 1, seen, len(dataset))
    return [(t / seen).float() for t in totals]


@METHODS.register("grad_x_act")
def grad_x_activation(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, **_) -> Scores:
    """sum over tokens of |activation * d log p(gold) / d activation|, one backward per batch for all layers."""

    def score(logits, acts, token_mask, batch):
        grads = torch.autograd.grad(gold_log_prob(logits, batch["labels"]).sum(), acts)
        return [((a * g).abs() * token_mask).sum((0, 1)).detach() for a, g in zip(acts, grads)]

    with torch.enable_grad():
        model.prompt.requires_grad_(True)  # the graph reaches the activations through the prompt
        return _accumulate(model, dataset, pad_id, batch_size, score)


@METHODS.register("activation")
def activation_magnitude(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, **_) -> Scores:
    """Mean |activation| over a neuron's tokens."""

    def score(logits, acts, token_mask, batch):
        return [(a.abs() * token_mask).sum((0, 1)) / token_mask.sum((1, 2)).mean() for a in acts]

    with torch.no_grad():
        return _accumulate(model, dataset, pad_id, batch_size, score)


@METHODS.register("random")
def random_scores(model: PromptClassifier, dataset=None, pad_id: int = 0, seed: int = 0, **_) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(d.in_features, generator=generator) for d in down_projections(model)]


def integrated_gradients_at(model: PromptClassifier, layer: int, batch: dict, n_steps: int = 16) -> torch.Tensor:
    """Signed integrated gradients of log p(gold) w.r.t. the input of down projection `layer`, from a zero
    activation baseline (captum's IntegratedGradients). Returns (batch, m+T, width)."""
    from captum.attr import IntegratedGradients

    down = down_projections(model)[layer]
    embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
    with capture_inputs([down]) as acts:
        model.features(embeds, mask)

    def forward(activation, inputs_embeds, attention_mask, labels):
        handle = down.register_forward_pre_hook(lambda _module, args: (activation, *args[1:]))
        try:
            return gold_log_prob(model.head(model.features(inputs_embeds, attention_mask)), labels)
        finally:
            handle.remove()

    with torch.enable_grad():
        return IntegratedGradients(forward).attribute(
            acts[0].detach(), baselines=0.0, n_steps=n_steps,
            additional_forward_args=(embeds.detach(), mask, batch["labels"]))


@METHODS.register("integrated_gradients")
def integrated_gradients(
    model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, n_steps: int = 16, **_
) -> Scores:
    """sum over tokens of |integrated gradients| per neuron; n_steps forward+backward passes per layer."""

    def score(logits, acts, token_mask, batch):
        return [(integrated_gradients_at(model, i, batch, n_steps).abs() * token_mask).sum((0, 1)).detach()
                for i in range(len(acts))]

    with torch.no_grad():
        return _accumulate(model, dataset, pad_id, batch_size, score)


def attribute(method: str, model: PromptClassifier, dataset, pad_id: int, **kwargs) -> Scores:
    return METHODS[method](model, dataset, pad_id, **kwargs)
