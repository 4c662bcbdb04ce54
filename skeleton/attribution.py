"""Task relevance of every FFN neuron: the activation entering each down projection, scored per method.

Each method returns one score tensor per layer, shape (intermediate_size,); higher means keep. A method that
takes `sites=` scores the input columns of any modules instead, which is how attention heads get scored in the
same pass (see attribute_with_heads at the end).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable

import torch

from skeleton.backbones import family_of
from skeleton.model import PromptClassifier
from skeleton.registry import Registry
from skeleton.train import batches, model_device, to_device

log = logging.getLogger("skeleton")

Scores = list[torch.Tensor]
Moments = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (mean, covariance)
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


def _down_inputs(model: PromptClassifier, dataset, pad_id: int, batch_size: int):
    """Per batch of `dataset`, a forward pass without the head: (the batch on the model's device, the input of every
    FFN down projection, the positions' attention mask)."""
    downs, device = down_projections(model), model_device(model)
    model.eval()
    for batch in batches(dataset, pad_id, batch_size):
        batch = to_device(batch, device)
        with capture_inputs(downs) as acts:
            embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
            model.features(embeds, mask)
        yield batch, list(acts), mask


def gold_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)


def _accumulate(model: PromptClassifier, dataset, pad_id: int, batch_size: int, score_batch,
                sites: list[torch.nn.Module] | None = None) -> Scores:
    """Sum `score_batch(logits, acts, token_mask, batch)` over batches, averaged per example. `acts` are the inputs
    of `sites` (default: the FFN down projections), one score per input column. Runs where the model is; the scores
    come back on the CPU."""
    modules = down_projections(model) if sites is None else list(sites)
    totals = [torch.zeros(m.in_features, dtype=torch.float64) for m in modules]
    seen, device = 0, model_device(model)
    model.eval()
    for i, batch in enumerate(batches(dataset, pad_id, batch_size)):
        batch = to_device(batch, device)
        with capture_inputs(modules) as acts:
            embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
            logits = model.head(model.features(embeds, mask))
        token_mask = mask.unsqueeze(-1).to(logits.dtype)  # (B, m+T, 1): padding does not count
        for total, layer_scores in zip(totals, score_batch(logits, acts, token_mask, batch)):
            total += layer_scores.double().cpu()
        seen += len(batch["labels"])
        log.info("attribution batch %d  examples %d/%d", i + 1, seen, len(dataset))
    return [(t / seen).float() for t in totals]


@METHODS.register("grad_x_act")
def grad_x_activation(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, sites=None,
                      **_) -> Scores:
    """sum over tokens of |activation * d log p(gold) / d activation|, one backward per batch for all layers."""

    def score(logits, acts, token_mask, batch):
        grads = torch.autograd.grad(gold_log_prob(logits, batch["labels"]).sum(), acts)
        return [((a * g).abs() * token_mask).sum((0, 1)).detach() for a, g in zip(acts, grads)]

    with torch.enable_grad():
        model.prompt.requires_grad_(True)  # the graph reaches the activations through the prompt
        return _accumulate(model, dataset, pad_id, batch_size, score, sites)


@METHODS.register("activation")
def activation_magnitude(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, sites=None,
                         **_) -> Scores:
    """Mean |activation| over a neuron's tokens."""

    def score(logits, acts, token_mask, batch):
        return [(a.abs() * token_mask).sum((0, 1)) / token_mask.sum((1, 2)).mean() for a in acts]

    with torch.no_grad():
        return _accumulate(model, dataset, pad_id, batch_size, score, sites)


@METHODS.register("wanda")
def weight_x_activation_norm(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, **_) -> Scores:
    """Structured Wanda: ||W_down[:, j]||_1 * ||a_j||_2, the sum of Wanda's |W| * ||X|| over the neuron's weights.

    The activation norm runs over every token of the calibration set (scaled per example; the ranking is the same)."""

    def score(logits, acts, token_mask, batch):
        return [(a.pow(2) * token_mask).sum((0, 1)) for a in acts]

    with torch.no_grad():
        squares = _accumulate(model, dataset, pad_id, batch_size, score)
    return [d.weight.detach().abs().sum(0).cpu() * s.sqrt() for d, s in zip(down_projections(model), squares)]


@METHODS.register("skill")
@torch.no_grad()
def skill_neurons(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32, **_) -> Scores:
    """Label predictivity of each neuron (skill neurons, Wang et al. 2022).

    A neuron's feature per example is its mean activation over the example's positions, soft prompt included
    (the paper reads the prompt positions of an encoder; a decoder's prompt cannot see the text, so all
    positions). Thresholded at its mean over the examples it predicts "class c" one-vs-rest; the score is the
    balanced accuracy of the better direction, max(b, 1 - b), averaged over the classes."""
    features: list[list[torch.Tensor]] = [[] for _ in down_projections(model)]
    labels = []
    for batch, acts, mask in _down_inputs(model, dataset, pad_id, batch_size):
        weights = mask.unsqueeze(-1).float()
        for layer, a in zip(features, acts):
            layer.append(((a * weights).sum(1) / weights.sum(1)).cpu())
        labels.append(batch["labels"].cpu())
    labels = torch.cat(labels)
    scores = []
    for layer in features:
        values = torch.cat(layer)  # (N, width)
        above = values > values.mean(0)
        balanced = []
        for c in labels.unique():
            is_c = (labels == c)[:, None]
            tpr = (above & is_c).float().sum(0) / is_c.sum()
            tnr = (~above & ~is_c).float().sum(0) / (~is_c).sum()
            b = (tpr + tnr) / 2
            balanced.append(torch.maximum(b, 1 - b))
        scores.append(torch.stack(balanced).mean(0))
    return scores


@METHODS.register("random")
def random_scores(model: PromptClassifier, dataset=None, pad_id: int = 0, seed: int = 0, sites=None, **_) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    sites = down_projections(model) if sites is None else sites
    return [torch.rand(d.in_features, generator=generator) for d in sites]


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


@torch.no_grad()
def activation_moments(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 32) -> Moments:
    """Per FFN layer, the mean (k,) and the covariance (k, k) of the down projection's input over all non-padding
    positions (soft prompt included), accumulated in float64: what `prune.reconstruct_ffn` regresses on."""
    downs = down_projections(model)
    sums = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    products = [torch.zeros(d.in_features, d.in_features, dtype=torch.float64) for d in downs]
    positions = 0
    for _, acts, mask in _down_inputs(model, dataset, pad_id, batch_size):
        for total, product, a in zip(sums, products, acts):
            a = a[mask.bool()].float()  # (positions, k); the float32 product per batch keeps this fast
            total += a.sum(0).double().cpu()
            product += (a.T @ a).double().cpu()
        positions += int(mask.sum())
    means = [t / positions for t in sums]
    return [(mean, product / positions - torch.outer(mean, mean)) for mean, product in zip(means, products)]


def attribute(method: str, model: PromptClassifier, dataset, pad_id: int, **kwargs) -> Scores:
    return METHODS[method](model, dataset, pad_id, **kwargs)


# --- Attention heads -----------------------------------------------------------------------------------------------
# A head is head_dim consecutive input columns of its layer's attention output projection (BERT: the input of
# BertSelfOutput.dense, the concatenated head outputs). A method that takes `sites=` scores those columns in the same
# pass (and, for grad_x_act, the same backward) as the FFN neurons; a head's score is the sum of its columns' scores:
# grad_x_act gives sum over tokens and head_dim columns of |a * d log p(gold) / d a|, averaged over examples.


def out_projections(model: PromptClassifier) -> list[torch.nn.Linear]:
    return [block.out for block in family_of(model.backbone).attention_blocks(model.backbone)]


def scores_heads(method: str) -> bool:
    """Whether a registered selection method can score attention heads too (it takes `sites=`)."""
    return "sites" in inspect.signature(METHODS[method]).parameters


def attribute_with_heads(method: str, model: PromptClassifier, dataset, pad_id: int,
                         **kwargs) -> tuple[Scores, Scores]:
    """(FFN neuron scores, attention head scores) in one pass: the first as `attribute` returns them, the second one
    tensor of shape (num_heads,) per layer. Raises ValueError for a method that cannot score heads and
    NotImplementedError for a family without head support."""
    if not scores_heads(method):
        able = ", ".join(m for m in METHODS if scores_heads(m))
        raise ValueError(f"selection method {method!r} does not score attention heads; methods that do: {able}")
    blocks = family_of(model.backbone).attention_blocks(model.backbone)
    downs = down_projections(model)
    scores = METHODS[method](model, dataset, pad_id, sites=downs + [b.out for b in blocks], **kwargs)
    heads = [s.view(-1, b.head_dim).sum(-1) for s, b in zip(scores[len(downs):], blocks)]
    return scores[:len(downs)], heads
