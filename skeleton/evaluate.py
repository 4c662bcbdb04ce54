"""Accuracy, macro-F1 and the linear-probe reference. (Latency: skeleton.benchmark.)"""
from __future__ import annotations

import logging

import torch

from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.train import accuracy, map_batches

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


def pooled_features(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    return map_batches(lambda b: model.features(*model.embed(b["input_ids"], b["attention_mask"])), dataset, pad_id,
                       batch_size)


def linear_probe(backbone, splits: dict, pad_id: int, num_labels: int, seed: int = 0) -> dict:
    """The task head alone, trained to convergence (L-BFGS) on frozen, un-prompted features (pooled as the
    backbone's family says: mean for BERT, last token for LLaMA).

    The L2 strength is picked on validation. Returns test metrics and the chosen strength.
    """
    probe = PromptClassifier(backbone, AdapterConfig(num_labels=num_labels, prompt_length=0), seed=seed)
    feats = {name: pooled_features(probe, ds, pad_id) for name, ds in splits.items()}
    labels = {name: torch.tensor(ds["label"]) for name, ds in splits.items()}
    best = None
    for l2 in (0.0, 1e-4, 1e-3, 1e-2):
        torch.manual_seed(seed)
        head = torch.nn.Linear(feats["train"].shape[1], num_labels)
        optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(feats["train"]), labels["train"]) + l2 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            val = metrics(head(feats["validation"]), labels["validation"], num_labels)["accuracy"]
            if best is None or val > best[0]:
                best = (val, l2, metrics(head(feats["test"]), labels["test"], num_labels))
    log.info("linear probe: val accuracy %.4f (l2 %g), test %s", best[0], best[1], best[2])
    return {**best[2], "val_accuracy": best[0], "l2": best[1]}
