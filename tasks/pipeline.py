"""Cached Prefect tasks over `skeleton.stages`: one wrapper, keyed on the stage's spec (skeleton/specs.py), so tasks
pass specs, paths and small records, never tensors or models.

    record = pipeline.build_skeleton(BuildSpec(...))      # or .submit(spec): a task per stage, all the same wrapper

A stage's output folder is <artifacts>/<spec.folder>/<hash of spec.key() and the library's source>, and its Prefect
cache key is the same hash (with the stage's name and this wrapper's source): an identical rerun recomputes nothing,
a changed parameter (or library) recomputes only what depends on it. Library imports happen inside the tasks, and
nothing is read or fixed at import: `prefect deploy` imports this module and must not load torch, and the artifacts
folder (SKELETON_ARTIFACTS) and the library's hash are looked up when a stage runs.

One cache that cannot lie: Prefect's result records are plain JSON (no pickle, no classes named in them), and a
record is used only while it is plain JSON and every stage folder it names passes its manifest; otherwise it is
dropped and the stage runs again. A stage that runs first takes its folder's lock and reuses the folder if it holds
a finished record (another sweep made it, or this one was killed before Prefect stored its result): so a killed
sweep resumes where it died and two sweeps on one artifacts folder compute each stage once.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import Task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.serializers import JSONSerializer

from skeleton.specs import (AttributeSpec, BenchmarkSpec, BuildSpec, DataSpec, EvalSpec, ProbeSpec, StageSpec,
                            TeacherSpec, TuneSpec)
from tasks.paths import INPUTS, artifacts_dir, results_dir, stage_folders

# Plain json both ways: no encoder for objects, and no decoder that imports a class named in the file.
SERIALIZER = JSONSerializer(object_encoder=None, object_decoder=None)
log = logging.getLogger("skeleton.pipeline")


@functools.cache
def library_version() -> str:
    """A hash of the library's source (skeleton/*.py), in every stage's key: a changed library recomputes."""
    package = Path(list(importlib.util.find_spec("skeleton").submodule_search_locations)[0])
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(spec: StageSpec) -> str:
    """The hash that names a stage's output folder: its spec's fields and the library's source."""
    from skeleton.io import stable_hash

    return stable_hash({**spec.key(), "library": library_version()})


def output_dir(spec: StageSpec) -> Path:
    return artifacts_dir() / spec.folder / stage_key(spec)


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
        record_file = results_dir() / key if key else None
        if record_file is not None and record_file.is_file():
            why = refusal(record_file)
            if why:
                log.warning("cached result of %s refused, running it again: %s", task_ctx.task.name, why)
                record_file.unlink(missing_ok=True)
        return key


def _spec_key(_context, parameters: dict) -> str:
    spec = parameters["spec"]
    return f"{spec.name}-{stage_key(spec)}"


def run_stage(spec: StageSpec, compute: Callable[[Path], dict]) -> dict:
    """`compute(out)`'s record, out the stage folder named by the spec, or the record `out` already holds when a
    finished, intact stage is there. One process at a time per folder (a lock the kernel drops if the holder dies);
    the inputs (what the folder was made from: tasks/gc.py follows them) and then the record are written last, so
    a folder without a record is never trusted."""
    from skeleton.io import failpoint, locked, read_stage_record, write_stage_record

    out = output_dir(spec)
    failpoint(f"start:{spec.name}")
    with locked(out):
        record = read_stage_record(out)
        if record is None:
            log.info("%s: computing %s", spec.name, out)
            result = compute(out)
            out.mkdir(parents=True, exist_ok=True)  # a stage that writes no files (a linear probe) gets a folder
            (out / INPUTS).write_text(json.dumps(spec.key(), default=str))
            record = write_stage_record(out, result)
        else:
            log.info("%s: reusing the finished stage folder %s", spec.name, out)
    failpoint(f"end:{spec.name}")  # the stage is done; Prefect has not stored its result yet
    return record


def run(spec: StageSpec) -> dict:
    """The record of the stage `spec` is for (skeleton.stages.run), computed in its folder or reused."""
    from skeleton import stages

    return run_stage(spec, lambda out: stages.run(out, spec))


class StageTask(Task):
    """The cached Prefect task of one stage. Prefect reads a task's result storage when the task runs; this one's is
    results_dir() of that moment, so importing this module fixes no folder."""

    @property
    def result_storage(self) -> Path:
        return results_dir()

    @result_storage.setter
    def result_storage(self, _value) -> None:
        pass  # Task.__init__ sets it; the folder is always results_dir()


def stage_task(spec: type[StageSpec], **options) -> StageTask:
    policy = VerifiedCache(policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_spec_key))
    return StageTask(run, name=spec.name, cache_policy=policy, persist_result=True, result_serializer=SERIALIZER,
                     **options)


# log_prints off: datasets fingerprints the tokenizing function with dill, which disassembles it into a captured
# stdout; the flow's log_prints would send those bytecode listings to the sweep's logs instead.
prepare_data = stage_task(DataSpec, log_prints=False)
tune_prompt = stage_task(TuneSpec)
linear_probe = stage_task(ProbeSpec)
attribute = stage_task(AttributeSpec)
teacher_logits = stage_task(TeacherSpec)
build_skeleton = stage_task(BuildSpec)
evaluate = stage_task(EvalSpec)
benchmark = stage_task(BenchmarkSpec)  # {"environment", "rows"}: rows named by model folder path
