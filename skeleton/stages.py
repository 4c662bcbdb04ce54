"""The Skeleton pipeline as stage functions `stage(out, spec) -> record`: what the Prefect tasks call.

Each stage takes its spec (skeleton/specs.py: every parameter it has), reads its inputs from the folders the spec
names, writes its output folder `out` atomically and returns a small JSON-able record, so an orchestrator can cache
and pass records without touching tensors or models. `run(out, spec)` runs the stage a spec is for.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from skeleton import benchmark as bench, data as data_lib
from skeleton.attribution import (activation_moments, attribute as attribute_neurons, attribute_with_heads,
                                  scores_heads)
from skeleton.backbones import attention_blocks, family_of, load_backbone
from skeleton.budget import loss_after_cutting, plan
from skeleton.evaluate import linear_probe as probe, metrics
from skeleton.folder import SCORES_RECORD, SkeletonFolder, method_of
from skeleton.io import atomic_dir
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.prune import reconstruct_ffn, slice_ffn, slice_heads
from skeleton.selection import keep_top, select, select_heads
from skeleton.specs import (AttributeSpec, BenchmarkSpec, BuildSpec, DataSpec, EvalSpec, ProbeSpec, StageSpec,
                            TeacherSpec, TuneSpec)
from skeleton.train import predict, train

log = logging.getLogger("skeleton")
INFO = "info.json"


def prepare_data(out: Path, spec: DataSpec) -> dict:
    """Load a registered task or a user file, tokenize it for the backbone, save it as Arrow."""
    if spec.data_file:
        dsd = data_lib.load_file(spec.data_file, text_column=spec.text_column, label_column=spec.label_column,
                                 seed=spec.seed)
    else:
        dsd = data_lib.load_task(spec.task_name, seed=spec.seed)
    _, tokenizer = load_backbone(spec.backbone)
    tokenized = data_lib.tokenize(dsd, tokenizer, spec.max_length)
    info = {**data_lib.describe(dsd), "task": spec.task_name, "pad_id": tokenizer.pad_token_id,
            "max_length": spec.max_length}
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


def tune_prompt(out: Path, spec: TuneSpec) -> dict:
    """Prompt-tune the full model and export it as a rate-0 skeleton (every neuron kept). With spec.train.tune_norms
    its normalisation layers train too (recorded as "tune_norms"), and every skeleton cut from it inherits them.
    With spec.train.finetune every backbone weight trains: the fine-tuned reference (usually with prompt_length 0:
    the head alone on top)."""
    dsd, info = load_data(spec.data)
    config = spec.train
    adapter = AdapterConfig(len(info["label_names"]), spec.prompt_length, info["label_names"],
                            prompt_method=spec.prompt_method)
    model_backbone, tokenizer = load_backbone(spec.backbone)
    model = PromptClassifier(model_backbone, adapter, seed=config.seed).to(spec.device)
    start = time.perf_counter()
    record = train(model, dsd["train"], dsd["validation"], info["pad_id"], config)
    record["train_seconds"] = time.perf_counter() - start
    meta = {"rate": 0.0, "backbone": spec.backbone, "task": info["task"], "max_length": info["max_length"],
            "tune_norms": config.tune_norms, "finetune": config.finetune, "prompt_method": spec.prompt_method,
            **record}
    SkeletonFolder.export(model, tokenizer, full_keep(model_backbone), out, meta)
    return {"path": str(out), **record}


def linear_probe(out: Path, spec: ProbeSpec) -> dict:
    """The probe's test metrics (it writes no files: `out` stays empty)."""
    dsd, info = load_data(spec.data)
    model_backbone, _ = load_backbone(spec.backbone, device=spec.device)
    return probe(model_backbone, dsd, info["pad_id"], len(info["label_names"]), seed=spec.seed,
                 precision=spec.precision)


def attribute(out: Path, spec: AttributeSpec) -> dict:
    """Score every FFN neuron on `examples` training examples, and every attention head in the same pass when the
    method and the backbone's family can; saved as Parquet (layer, neuron, score, unit): unit "ffn" rows are FFN
    neurons, "head" rows attention heads (neuron = head index). Files from before heads have no unit column:
    read_scores takes them as all "ffn"."""
    dsd, info = load_data(spec.data)
    classifier = SkeletonFolder(spec.model).load()[0].to(spec.device)
    subset = dsd["train"].shuffle(seed=spec.seed).select(range(min(spec.examples, len(dsd["train"]))))
    with_heads = scores_heads(spec.method) and bool(attention_blocks(classifier.backbone))
    score = attribute_with_heads if with_heads else attribute_neurons
    start = time.perf_counter()
    scores = score(spec.method, classifier, subset, info["pad_id"], batch_size=spec.batch_size, seed=spec.seed)
    seconds = time.perf_counter() - start
    units = {"ffn": scores[0], "head": scores[1]} if with_heads else {"ffn": scores}  # tolist(): any device
    table = pd.DataFrame([{"layer": i, "neuron": j, "score": float(s), "unit": unit} for unit, layers in units.items()
                          for i, layer in enumerate(layers) for j, s in enumerate(layer.tolist())])
    record = {"method": spec.method, "examples": len(subset), "seconds": seconds, "heads": with_heads}
    with atomic_dir(out) as tmp:
        table.to_parquet(tmp / "scores.parquet", index=False)
        (tmp / SCORES_RECORD).write_text(json.dumps(record))  # how the scores were made, for the skeletons' meta
    return {"path": str(out / "scores.parquet"), **record}


def read_scores(path: str | Path, unit: str = "ffn") -> list[torch.Tensor]:
    """Per-layer scores of one unit ("ffn" neurons or attention "head"s); [] when the file has none of that unit."""
    table = pd.read_parquet(path)
    if "unit" not in table:
        table["unit"] = "ffn"  # written before head scores existed
    table = table[table["unit"] == unit].sort_values(["layer", "neuron"])
    return [torch.tensor(group["score"].to_numpy()) for _, group in table.groupby("layer")]


def teacher_logits(out: Path, spec: TeacherSpec) -> dict:
    """The full model's logits on the training split: soft labels for re-tuning its skeletons."""
    dsd, info = load_data(spec.data)
    classifier = SkeletonFolder(spec.model).load()[0].to(spec.device)
    logits = predict(classifier, dsd["train"], info["pad_id"])
    with atomic_dir(out) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp / "train_logits.safetensors"))
    return {"path": str(out / "train_logits.safetensors")}


def build_skeleton(out: Path, spec: BuildSpec) -> dict:
    """Keep the top (1 - rate) FFN neurons (and top (1 - head_rate) attention heads), slice the rest out, re-tune
    prompt and head, export.

    `allocation` (selection.ALLOCATIONS) decides how many each layer keeps: "uniform" (the same FFN width in every
    layer), "global" or "per_layer"; heads follow the same rule, at least one per layer. With `teacher` (train
    logits of the full model) and train.distill > 0, re-tuning also matches the full model's soft labels.
    With `target_speedup`, the joint budget (skeleton.budget.plan) decides instead of rate / head_rate how many
    neurons and heads to cut, for texts of the data's max_length: of its candidate mixes, the one whose cut model
    has the lowest validation loss before re-tuning (the candidates and their losses are in the record).
    With `reconstruct`, the kept neurons' down-projection columns (and bias) are refit before slicing to carry what
    the removed neurons added (prune.reconstruct_ffn), from activation statistics of `calibration_examples`
    training examples. With train.tune_norms, re-tuning also trains the normalisation layers (train.TrainConfig).
    The skeleton's "tune_norms" records whether its normalisation layers are its own: trained in re-tuning, or
    inherited from a full model prompt-tuned with tune_norms."""
    rate, head_rate, config = spec.rate, spec.head_rate, spec.train  # checked when the spec was made
    head_scores = read_scores(spec.scores, unit="head") if head_rate > 0 or spec.target_speedup else []
    if head_rate > 0 and not head_scores:
        raise ValueError(f"head_rate={head_rate} needs attention-head scores, and {spec.scores} has none: re-run "
                         "attribution with a method that scores heads (e.g. grad_x_act, activation, random)")
    dsd, info = load_data(spec.data)
    classifier, tokenizer, parent = SkeletonFolder(spec.model).load()
    classifier = classifier.to(spec.device)
    ffn_scores = read_scores(spec.scores)
    joint = {}
    if spec.target_speedup:  # the achieved rates are recorded as this skeleton's rate and head_rate
        judge = loss_after_cutting(classifier, ffn_scores, head_scores, dsd["validation"], info["pad_id"])
        choice, tried = plan(classifier, ffn_scores, head_scores, spec.target_speedup, info["max_length"], judge,
                             spec.allocation)
        joint = {"target_speedup": spec.target_speedup, "joint_candidates": tried}
        keep = keep_top(ffn_scores, choice.ffn)
        rate, head_rate = choice.rate(ffn_scores), choice.head_rate(head_scores)
        heads = keep_top(head_scores, choice.heads) if head_rate > 0 else None
    else:
        keep = select(ffn_scores, rate, spec.allocation)
        heads = select_heads(head_scores, head_rate, spec.allocation) if head_rate > 0 else None
    if heads is not None:
        slice_heads(classifier.backbone, heads)
        classifier.prompt.keep_heads(heads)  # a prefix holds keys and values per head
    if spec.reconstruct:  # statistics of the network as it will run: heads already cut, every FFN neuron still there
        sample = dsd["train"].shuffle(seed=config.seed)
        sample = sample.select(range(min(spec.calibration_examples, len(sample))))
        reconstruct_ffn(classifier.backbone, keep, activation_moments(classifier, sample, info["pad_id"]), spec.damping)
    slice_ffn(classifier.backbone, keep)
    train_set = dsd["train"]
    if spec.teacher:
        train_set = train_set.add_column("teacher", load_file(spec.teacher)["logits"].tolist())
    start = time.perf_counter()
    # the layer-by-layer teacher
    full = SkeletonFolder(spec.model).load()[0].to(spec.device) if config.distill_hidden else None
    record = train(classifier, train_set, dsd["validation"], info["pad_id"], config, teacher=full)
    record["train_seconds"] = time.perf_counter() - start
    widths = [len(k) for k in keep]
    shape = {"kept_width": round(sum(widths) / len(widths)),  # the width of every layer unless they differ: the mean
             "kept_widths": widths, "allocation": spec.allocation, "head_rate": head_rate,
             "reconstruct": spec.reconstruct, "tune_norms": config.tune_norms or bool(parent.get("tune_norms")),
             "target_speedup": spec.target_speedup, "prompt_method": classifier.config.prompt_method,
             **joint, **({"kept_heads": [len(h) for h in heads]} if heads is not None else {})}
    meta = {"rate": rate, **shape, "scores": spec.scores, "method": method_of(spec.scores), "task": info["task"],
            "backbone": parent.get("backbone"), "max_length": info["max_length"], **record}
    SkeletonFolder.export(classifier, tokenizer, keep, out, meta, heads=heads)
    return {"path": str(out), "rate": rate, **shape, **record}


def evaluate(out: Path, spec: EvalSpec) -> dict:
    """Test metrics of an exported model, loaded back from disk; saves the logits it was judged on."""
    dsd, info = load_data(spec.data)
    classifier = SkeletonFolder(spec.model).load()[0].to(spec.device)
    logits = predict(classifier, dsd["test"], info["pad_id"])
    result = {**metrics(logits, dsd["test"]["label"], len(info["label_names"])),
              "parameters": classifier.num_parameters(), "model": spec.model}
    with atomic_dir(out) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp / "test_logits.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
    return {**result, "logits": str(out / "test_logits.safetensors")}


def benchmark(out: Path | None, spec: BenchmarkSpec) -> dict:
    """Speed-up of each skeleton over the full model (and over each of `baselines`, other model folders: rows'
    "speedups"), with its arithmetic bound, at every batch size x text length (`skeleton.benchmark`), measured in a
    new Python process; writes no files (`out` stays empty). Returns {"environment", "rows"}; rows are named by
    model folder path.

    Why a fresh process: one that has trained and evaluated models runs the wide float32 passes of a full model
    differently (allocator and cache state): inside a sweep the speed-ups came out up to 16% below what the
    standalone harness measured on the same folders minutes later."""
    done = subprocess.run([sys.executable, "-m", "skeleton.stages", "benchmark", json.dumps(asdict(spec))],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the benchmark process failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(spec: BenchmarkSpec) -> dict:
    """The benchmark of `spec` in this process (what benchmark's fresh process runs)."""
    config = bench.BenchmarkConfig(batch_sizes=spec.batch_sizes, lengths=spec.lengths, repeats=spec.repeats,
                                   device=spec.device)
    folders = {path: path for path in dict.fromkeys([spec.full, *spec.skeletons, *spec.baselines])}
    return bench.benchmark_folders(folders, config, reference=spec.full, baselines=list(spec.baselines))


STAGES = {DataSpec: prepare_data, TuneSpec: tune_prompt, ProbeSpec: linear_probe, AttributeSpec: attribute,
          TeacherSpec: teacher_logits, BuildSpec: build_skeleton, EvalSpec: evaluate, BenchmarkSpec: benchmark}


def run(out: Path, spec: StageSpec) -> dict:
    """Run the stage `spec` is for, into the folder `out`; its record."""
    return STAGES[type(spec)](out, spec)


if __name__ == "__main__" and sys.argv[1:2] == ["benchmark"]:  # the fresh process of benchmark()
    print(json.dumps(measure(BenchmarkSpec(**json.loads(sys.argv[2])))))
