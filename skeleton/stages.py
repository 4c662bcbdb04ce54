"""The Skeleton pipeline as path-in, path-out stage functions: what the Prefect tasks call.

Each stage reads its inputs from folders, writes its output folder atomically and returns a small JSON-able
record, so an orchestrator can cache and pass records without touching tensors or models.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from skeleton import data as data_lib
from skeleton.attribution import attribute as attribute_neurons
from skeleton.backbones import family_of, load_backbone
from skeleton.evaluate import interleaved_latency, linear_probe as probe, metrics
from skeleton.io import atomic_dir
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.prune import check_rate, export_skeleton, load_skeleton, select, slice_ffn
from skeleton.train import TrainConfig, predict, train

log = logging.getLogger("skeleton")
INFO = "info.json"


def prepare_data(out: Path, task: str, backbone: str, max_length: int = 64, seed: int = 0,
                 data_file: str | None = None, text_column: str = "text", label_column: str = "label") -> dict:
    """Load a registered task or a user file, tokenize it for the backbone, save it as Arrow."""
    if data_file:
        dsd = data_lib.load_file(data_file, text_column=text_column, label_column=label_column, seed=seed)
    else:
        dsd = data_lib.load_task(task, seed=seed)
    _, tokenizer = load_backbone(backbone)
    tokenized = data_lib.tokenize(dsd, tokenizer, max_length)
    info = {**data_lib.describe(dsd), "task": task, "pad_id": tokenizer.pad_token_id, "max_length": max_length}
    with atomic_dir(out) as tmp:
        tokenized.save_to_disk(str(tmp / "tokenized"))
        (tmp / INFO).write_text(json.dumps(info, indent=1))
    return {"path": str(out), **info}


def load_data(path: str | Path):
    from datasets import load_from_disk

    path = Path(path)
    return load_from_disk(str(path / "tokenized")), json.loads((path / INFO).read_text())


def full_keep(backbone) -> list[torch.Tensor]:
    return [torch.arange(b.down.in_features) for b in family_of(backbone).ffn_blocks(backbone)]


def tune_prompt(out: Path, data: str, backbone: str, prompt_length: int, train_config: dict) -> dict:
    """Prompt-tune the full model and export it as a rate-0 skeleton (every neuron kept)."""
    dsd, info = load_data(data)
    config = TrainConfig(**train_config)
    model_backbone, tokenizer = load_backbone(backbone)
    model = PromptClassifier(model_backbone, AdapterConfig(len(info["label_names"]), prompt_length, info["label_names"]),
                             seed=config.seed)
    start = time.perf_counter()
    record = train(model, dsd["train"], dsd["validation"], info["pad_id"], config)
    record["train_seconds"] = time.perf_counter() - start
    export_skeleton(model, tokenizer, full_keep(model_backbone), out, {"rate": 0.0, "backbone": backbone, **record})
    return {"path": str(out), **record}


def linear_probe(data: str, backbone: str, seed: int = 0) -> dict:
    dsd, info = load_data(data)
    model_backbone, _ = load_backbone(backbone)
    return probe(model_backbone, dsd, info["pad_id"], len(info["label_names"]), seed=seed)


def attribute(out: Path, data: str, model: str, method: str, examples: int = 1024, batch_size: int = 32,
              seed: int = 0) -> dict:
    """Score every FFN neuron on `examples` training examples; saved as Parquet (layer, neuron, score)."""
    dsd, info = load_data(data)
    classifier, _, _ = load_skeleton(model)
    subset = dsd["train"].shuffle(seed=seed).select(range(min(examples, len(dsd["train"]))))
    start = time.perf_counter()
    scores = attribute_neurons(method, classifier, subset, info["pad_id"], batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - start
    table = pd.DataFrame([{"layer": i, "neuron": j, "score": float(s)} for i, layer in enumerate(scores)
                          for j, s in enumerate(layer.tolist())])
    with atomic_dir(out) as tmp:
        table.to_parquet(tmp / "scores.parquet", index=False)
    return {"path": str(out / "scores.parquet"), "method": method, "examples": len(subset), "seconds": seconds}


def read_scores(path: str | Path) -> list[torch.Tensor]:
    table = pd.read_parquet(path).sort_values(["layer", "neuron"])
    return [torch.tensor(group["score"].to_numpy()) for _, group in table.groupby("layer")]


def teacher_logits(out: Path, data: str, model: str) -> dict:
    """The full model's logits on the training split: soft labels for re-tuning its skeletons."""
    dsd, info = load_data(data)
    classifier, _, _ = load_skeleton(model)
    logits = predict(classifier, dsd["train"], info["pad_id"])
    with atomic_dir(out) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp / "train_logits.safetensors"))
    return {"path": str(out / "train_logits.safetensors")}


def build_skeleton(out: Path, data: str, model: str, scores: str, rate: float, train_config: dict,
                   teacher: str | None = None) -> dict:
    """Keep the top (1 - rate) neurons per layer, slice them out, re-tune prompt and head, export.

    With `teacher` (train logits of the full model) and train_config["distill"] > 0, re-tuning also matches the
    full model's soft labels."""
    check_rate(rate)
    dsd, info = load_data(data)
    classifier, tokenizer, _ = load_skeleton(model)
    keep = select(read_scores(scores), rate)
    slice_ffn(classifier.backbone, keep)
    train_set = dsd["train"]
    if teacher:
        train_set = train_set.add_column("teacher", load_file(teacher)["logits"].tolist())
    start = time.perf_counter()
    record = train(classifier, train_set, dsd["validation"], info["pad_id"], TrainConfig(**train_config))
    record["train_seconds"] = time.perf_counter() - start
    meta = {"rate": rate, "kept_width": len(keep[0]), "scores": scores, **record}
    export_skeleton(classifier, tokenizer, keep, out, meta)
    return {"path": str(out), "rate": rate, "kept_width": len(keep[0]), **record}


def evaluate(out: Path, data: str, model: str) -> dict:
    """Test metrics of an exported model, loaded back from disk; saves the logits it was judged on."""
    dsd, info = load_data(data)
    classifier, _, _ = load_skeleton(model)
    logits = predict(classifier, dsd["test"], info["pad_id"])
    result = {**metrics(logits, dsd["test"]["label"], len(info["label_names"])),
              "parameters": classifier.num_parameters(), "model": model}
    with atomic_dir(out) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp / "test_logits.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
    return {**result, "logits": str(out / "test_logits.safetensors")}


def benchmark(full: str, skeletons: list[str], batch_size: int = 32, seq_len: int = 64, repeats: int = 20) -> dict:
    """Speed-up of each skeleton over the full model: medians of interleaved forward passes in one process."""
    models = {path: load_skeleton(path)[0] for path in [full, *skeletons]}
    seconds = interleaved_latency(models, batch_size=batch_size, seq_len=seq_len, repeats=repeats)
    return {path: {"latency_s": seconds[path], "speedup": seconds[full] / seconds[path]} for path in skeletons}
