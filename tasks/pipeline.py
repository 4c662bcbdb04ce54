"""Cached Prefect tasks over `skeleton.stages`: each passes paths and small records, never tensors or models.

Cache keys are the task's inputs, its source and the library's source, so an identical rerun recomputes
nothing and a changed input recomputes only what depends on it. Output folders are named by the same inputs.
Library imports happen inside the tasks: `prefect deploy` imports this module and must not load torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_BATCH_SIZE = 32  # the sweep's headline speed-up (at max_length text tokens), and the nightly baseline's
# The sweep's in-flow latency grid, at max_length text tokens: cheap. The full grid: scripts/benchmark.py.
BENCHMARK_BATCH_SIZES = [1, BENCHMARK_BATCH_SIZE]


def artifacts_dir() -> Path:
    return Path(os.environ.get("SKELETON_ARTIFACTS", ROOT / "artifacts")).resolve()


def _library_source_hash() -> str:
    package = Path(list(importlib.util.find_spec("skeleton").submodule_search_locations)[0])
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


LIBRARY_VERSION = _library_source_hash()
CACHED = dict(
    cache_policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda *_: LIBRARY_VERSION),
    persist_result=True,
    result_storage=artifacts_dir() / ".prefect-results",
)


def output_dir(stage: str, **inputs) -> Path:
    from skeleton.io import stable_hash

    return artifacts_dir() / stage / stable_hash({**inputs, "library": LIBRARY_VERSION})


@task(name="prepare-data", **CACHED)
def prepare_data(task_name: str, backbone: str, max_length: int, seed: int, data_file: str | None = None,
                 text_column: str = "text", label_column: str = "label", data_file_hash: str | None = None) -> dict:
    from skeleton import stages

    inputs = dict(task_name=task_name, backbone=backbone, max_length=max_length, seed=seed, data_file=data_file,
                  text_column=text_column, label_column=label_column, data_file_hash=data_file_hash)
    return stages.prepare_data(output_dir("data", **inputs), task_name, backbone, max_length, seed,
                               data_file, text_column, label_column)


@task(name="tune-prompt", **CACHED)
def tune_prompt(data: str, backbone: str, prompt_length: int, train_config: dict) -> dict:
    from skeleton import stages

    out = output_dir("models", data=data, backbone=backbone, prompt_length=prompt_length, train=train_config)
    return stages.tune_prompt(out, data, backbone, prompt_length, train_config)


@task(name="linear-probe", **CACHED)
def linear_probe(data: str, backbone: str, seed: int, precision: str) -> dict:
    from skeleton import stages

    return stages.linear_probe(data, backbone, seed, precision)


@task(name="attribute", **CACHED)
def attribute(data: str, model: str, method: str, examples: int, seed: int) -> dict:
    from skeleton import stages

    out = output_dir("scores", data=data, model=model, method=method, examples=examples, seed=seed)
    return stages.attribute(out, data, model, method, examples=examples, seed=seed)


@task(name="teacher-logits", **CACHED)
def teacher_logits(data: str, model: str) -> dict:
    from skeleton import stages

    return stages.teacher_logits(output_dir("teacher", data=data, model=model), data, model)


@task(name="build-skeleton", **CACHED)
def build_skeleton(data: str, model: str, scores: str, rate: float, train_config: dict, teacher: str | None = None,
                   head_rate: float = 0.0, allocation: str = "uniform", reconstruct: bool = False,
                   target_speedup: float | None = None) -> dict:
    from skeleton import stages

    out = output_dir("skeletons", data=data, model=model, scores=scores, rate=rate, train=train_config,
                     teacher=teacher, head_rate=head_rate, allocation=allocation, reconstruct=reconstruct,
                     target_speedup=target_speedup)
    return stages.build_skeleton(out, data, model, scores, rate, train_config, teacher, head_rate=head_rate,
                                 allocation=allocation, reconstruct=reconstruct, target_speedup=target_speedup)


@task(name="evaluate", **CACHED)
def evaluate(data: str, model: str) -> dict:
    from skeleton import stages

    return stages.evaluate(output_dir("eval", data=data, model=model), data, model)


@task(name="benchmark-latency", **CACHED)
def benchmark(full: str, skeletons: list[str], batch_sizes: list[int], lengths: list[int], repeats: int) -> dict:
    """{"environment", "rows"}: a row per (model path, batch size, text length); see skeleton.benchmark."""
    from skeleton import stages

    return stages.benchmark(full, skeletons, batch_sizes, lengths, repeats)
