"""Accuracy, macro-F1 and the linear-probe reference. (Latency: skeleton.benchmark.)"""
from __future__ import annotations

import logging

import torch

from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.train import accuracy, autocast, length_sorted, model_device, to_device

log = logging.getLogger("skeleton")


def macro_f1(logits: torch.Tensor, labels, num_labels: int) -> float:
    pred, gold = logits.argmax(-1), torch.as_tensor(labels)
    f1s = []
    for c in range(num_labels):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / num_labels


def metrics(logits: torch.Tensor, labels, num_labels: int) -> dict[str, float]:
    return {"accuracy": accuracy(logits, labels), "macro_f1": macro_f1(logits, labels, num_labels)}


def drop_interval(labels, reference_logits: torch.Tensor, logits: torch.Tensor, confidence: float = 0.9,
                  resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """How far apart two models' accuracies on one split can be read: the paired bootstrap interval of the drop
    (reference's accuracy minus the model's, a ratio). The examples are resampled with replacement `resamples`
    times, both models judged on the same draw; the central `confidence` share of the drops is returned. Paired,
    because the two models err on many of the same examples: the interval is narrower than two separate ones."""
    gold = torch.as_tensor(labels)
    diff = (reference_logits.argmax(-1) == gold).float() - (logits.argmax(-1) == gold).float()
    draws = torch.randint(len(diff), (resamples, len(diff)), generator=torch.Generator().manual_seed(seed))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(diff[draws].mean(1), torch.tensor([tail, 1 - tail])).tolist()
    return low, high


@torch.no_grad()
def frozen_states(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 64,
                  precision: str = "fp32") -> list[tuple[torch.Tensor, ...]]:
    """(hidden states, attention mask, labels) per batch of length-sorted examples: the backbone's output once, for
    heads that train on frozen features. The states are float32 whatever the arithmetic that made them, and stay
    where the model is."""
    out, device = [], model_device(model)
    for batch in length_sorted(dataset, pad_id, batch_size):
        batch = to_device(batch, device)
        embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
        with autocast(precision, embeds.device):
            hidden = model.hidden(embeds, mask)
        out.append((hidden.float(), mask, batch["labels"]))
    return out


def _fit(parameters, loss) -> None:
    """Minimise loss() over `parameters` to convergence: full-batch L-BFGS."""
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)


L2_STRENGTHS = (0.0, 1e-4, 1e-3, 1e-2)


def linear_probe(backbone, splits: dict, pad_id: int, num_labels: int, seed: int = 0, precision: str = "fp32") -> dict:
    """The task head alone (the same pooling and linear layer as prompt tuning, as the backbone's family says),
    trained to convergence on frozen, un-prompted hidden states.

    A pooling query (attention pooling) is fitted once, together with a linear layer; then, on the features it
    pools, the linear layer is refitted for each L2 strength and the strength is picked on validation (refitting the
    query per strength would cost a pass over every token per step). Runs where the backbone is. Returns test
    metrics and the chosen strength.
    """
    probe = PromptClassifier(backbone, AdapterConfig(num_labels=num_labels, prompt_length=0), seed=seed)
    states = {name: frozen_states(probe, ds, pad_id, precision=precision) for name, ds in splits.items()}
    labels = {name: torch.cat([y for _, _, y in batches]) for name, batches in states.items()}
    cross_entropy = torch.nn.functional.cross_entropy

    def pooled(split: str) -> torch.Tensor:
        return torch.cat([probe.pool(hidden, mask) for hidden, mask, _ in states[split]])

    if probe.query is not None:
        _fit(probe.head_parameters(), lambda: cross_entropy(probe.head(pooled("train")), labels["train"]))
    with torch.no_grad():
        features = {name: pooled(name) for name in states}
    best = None
    for l2 in L2_STRENGTHS:
        torch.manual_seed(seed)
        head = torch.nn.Linear(features["train"].shape[1], num_labels).to(features["train"].device)
        _fit(head.parameters(), lambda head=head, l2=l2: cross_entropy(head(features["train"]), labels["train"])
             + l2 * head.weight.pow(2).sum())
        with torch.no_grad():
            val = metrics(head(features["validation"]), labels["validation"], num_labels)["accuracy"]
            if best is None or val > best[0]:
                best = (val, l2, metrics(head(features["test"]), labels["test"], num_labels))
    log.info("linear probe: val accuracy %.4f (l2 %g), test %s", best[0], best[1], best[2])
    return {**best[2], "val_accuracy": best[0], "l2": best[1]}
