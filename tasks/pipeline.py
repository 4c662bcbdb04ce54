"""Cached Prefect tasks over `skeleton.stages`: each passes paths and small records, never tensors or models.

Cache keys are the task's inputs, its source and the library's source, so an identical rerun recomputes
nothing and a changed input recomputes only what depends on it. Output folders are named by the same inputs.
Library imports happen inside the tasks: `prefect deploy` imports this module and must not load torch.

One cache that cannot lie: Prefect's result records are plain JSON (no pickle, no classes named in them), and a
record is used only while it is plain JSON and every stage folder it names passes its manifest; otherwise it is
dropped and the stage runs again. A stage that runs first takes its folder's lock and reuses the folder if it holds
a finished record (another sweep made it, or this one was killed before Prefect stored its result): so a killed
sweep resumes where it died and two sweeps on one artifacts folder compute each stage once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Whatever Prefect persists without a serializer of its own is JSON too, not its default pickle.
os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")

from prefect import task  # noqa: E402
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy  # noqa: E402
from prefect.serializers import JSONSerializer  # noqa: E402

from tasks.paths import artifacts_dir, stage_folders  # noqa: E402

BENCHMARK_BATCH_SIZE = 32  # the sweep's headline speed-up (at max_length text tokens), and the nightly baseline's
# The sweep's in-flow latency grid, at max_length text tokens: cheap. The full grid: `skeleton benchmark`.
BENCHMARK_BATCH_SIZES = [1, BENCHMARK_BATCH_SIZE]


def _library_source_hash() -> str:
    package = Path(list(importlib.util.find_spec("skeleton").submodule_search_locations)[0])
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


LIBRARY_VERSION = _library_source_hash()
RESULTS = artifacts_dir() / ".prefect-results"
# Plain json both ways: no encoder for objects, and no decoder that imports a class named in the file.
SERIALIZER = JSONSerializer(object_encoder=None, object_decoder=None)
log = logging.getLogger("skeleton.pipeline")
INPUTS_FILE = "inputs.json"  # beside a stage folder's record: the inputs its name was hashed from


def refusal(record_file: Path) -> str | None:
    """Why a stored result record must not be used (None: it may). Read as plain JSON, never through the
    serializer it names: a record naming pickle (or any other loader) is refused unread."""
    try:
        stored = json.loads(record_file.read_bytes())
        serializer = stored["metadata"]["serializer"]
        if serializer != SERIALIZER.model_dump(mode="json"):
            return f"it names serializer {serializer!r}, not plain JSON"
        result = json.loads(stored["result"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"it is not a readable JSON record ({type(e).__name__}: {e})"
    from skeleton.io import ArtifactError, verify_dir

    for folder in stage_folders(result):
        try:
            verify_dir(folder)
        except ArtifactError as e:
            return str(e)
    return None


@dataclass
class VerifiedCache(CachePolicy):
    """The key of `policy`; before Prefect looks it up, a stored record that `refusal` rejects is deleted, so the
    lookup misses and the task runs again."""
    policy: CachePolicy | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        record_file = RESULTS / key if key else None
        if record_file is not None and record_file.is_file():
            why = refusal(record_file)
            if why:
                log.warning("cached result of %s refused, running it again: %s", task_ctx.task.name, why)
                record_file.unlink(missing_ok=True)
        return key


CACHED = dict(
    cache_policy=VerifiedCache(policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda *_: LIBRARY_VERSION)),
    persist_result=True,
    result_storage=RESULTS,
    result_serializer=SERIALIZER,
)


def output_dir(stage: str, **inputs) -> Path:
    from skeleton.io import stable_hash

    return artifacts_dir() / stage / stable_hash({**inputs, "library": LIBRARY_VERSION})


def run_stage(name: str, stage: str, inputs: dict, compute: Callable[[Path], dict]) -> dict:
    """`compute(out)`'s record, out the stage folder named by `inputs`, or the record `out` already holds when a
    finished, intact stage is there. One process at a time per folder (a lock the kernel drops if the holder dies);
    the inputs (what the folder was made from: tasks/gc.py follows them) and then the record are written last, so
    a folder without a record is never trusted."""
    from skeleton.io import failpoint, locked, read_record, write_record

    out = output_dir(stage, **inputs)
    failpoint(f"start:{name}")
    with locked(out):
        record = read_record(out)
        if record is None:
            log.info("%s: computing %s", name, out)
            result = compute(out)
            out.mkdir(parents=True, exist_ok=True)  # a stage that writes no files (a linear probe) gets a folder
            (out / INPUTS_FILE).write_text(json.dumps(inputs, default=str))
            record = write_record(out, result)
        else:
            log.info("%s: reusing the finished stage folder %s", name, out)
    failpoint(f"end:{name}")  # the stage is done; Prefect has not stored its result yet
    return record


# log_prints off: datasets fingerprints the tokenizing function with dill, which disassembles it into a captured
# stdout; the flow's log_prints would send those bytecode listings to the sweep's logs instead.
@task(name="prepare-data", log_prints=False, **CACHED)
def prepare_data(task_name: str, backbone: str, max_length: int, seed: int, data_file: str | None = None,
                 text_column: str = "text", label_column: str = "label", data_file_hash: str | None = None) -> dict:
    from skeleton import stages

    inputs = dict(task_name=task_name, backbone=backbone, max_length=max_length, seed=seed, data_file=data_file,
                  text_column=text_column, label_column=label_column, data_file_hash=data_file_hash)
    return run_stage("prepare-data", "data", inputs, lambda out: stages.prepare_data(
        out, task_name, backbone, max_length, seed, data_file, text_column, label_column))


@task(name="tune-prompt", **CACHED)
def tune_prompt(data: str, backbone: str, prompt_length: int, train_config: dict, prompt_method: str = "input") -> dict:
    from skeleton import stages

    inputs = dict(data=data, backbone=backbone, prompt_length=prompt_length, train=train_config,
                  prompt_method=prompt_method)
    return run_stage("tune-prompt", "models", inputs, lambda out: stages.tune_prompt(
        out, data, backbone, prompt_length, train_config, prompt_method))


@task(name="linear-probe", **CACHED)
def linear_probe(data: str, backbone: str, seed: int, precision: str) -> dict:
    from skeleton import stages

    inputs = dict(data=data, backbone=backbone, seed=seed, precision=precision)
    return run_stage("linear-probe", "probe", inputs, lambda out: stages.linear_probe(data, backbone, seed, precision))


@task(name="attribute", **CACHED)
def attribute(data: str, model: str, method: str, examples: int, seed: int) -> dict:
    from skeleton import stages

    inputs = dict(data=data, model=model, method=method, examples=examples, seed=seed)
    return run_stage("attribute", "scores", inputs, lambda out: stages.attribute(
        out, data, model, method, examples=examples, seed=seed))


@task(name="teacher-logits", **CACHED)
def teacher_logits(data: str, model: str) -> dict:
    from skeleton import stages

    return run_stage("teacher-logits", "teacher", dict(data=data, model=model),
                     lambda out: stages.teacher_logits(out, data, model))


@task(name="build-skeleton", **CACHED)
def build_skeleton(data: str, model: str, scores: str, rate: float, train_config: dict, teacher: str | None = None,
                   head_rate: float = 0.0, allocation: str = "uniform", reconstruct: bool = False,
                   target_speedup: float | None = None) -> dict:
    from skeleton import stages

    inputs = dict(data=data, model=model, scores=scores, rate=rate, train=train_config, teacher=teacher,
                  head_rate=head_rate, allocation=allocation, reconstruct=reconstruct, target_speedup=target_speedup)
    return run_stage("build-skeleton", "skeletons", inputs, lambda out: stages.build_skeleton(
        out, data, model, scores, rate, train_config, teacher, head_rate=head_rate, allocation=allocation,
        reconstruct=reconstruct, target_speedup=target_speedup))


@task(name="evaluate", **CACHED)
def evaluate(data: str, model: str) -> dict:
    from skeleton import stages

    return run_stage("evaluate", "eval", dict(data=data, model=model), lambda out: stages.evaluate(out, data, model))


@task(name="benchmark-latency", **CACHED)
def benchmark(full: str, skeletons: list[str], batch_sizes: list[int], lengths: list[int], repeats: int,
              baselines: list[str] = ()) -> dict:
    """{"environment", "rows"}: a row per (model path, batch size, text length), measured in a fresh process,
    against `full` and each of `baselines`; see skeleton.stages.benchmark."""
    from skeleton import stages

    inputs = dict(full=full, skeletons=skeletons, batch_sizes=batch_sizes, lengths=lengths, repeats=repeats,
                  baselines=list(baselines))
    return run_stage("benchmark-latency", "benchmark", inputs, lambda out: stages.benchmark(
        full, skeletons, batch_sizes, lengths, repeats, baselines=list(baselines)))
