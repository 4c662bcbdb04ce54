"""Disk that does not fill: list, and on request remove, the stage folders that nothing refers to.

    skeleton gc                      # dry run: each folder that would go, its size, the total
    skeleton gc --delete             # remove them, with the Prefect result records and locks that name them
    skeleton gc --min-age-hours 0    # also folders written in the last 24 hours (default: kept)

Kept: every stage folder of <artifacts>/<stage>/<hash> that an MLflow run refers to (its params, tags, or a
sweep's results.parquet), that an MLflow logged model was made from (its `skeleton.manifest` tag: what registered
model versions point to), or that the nightly baseline holds; then, transitively, every folder their records
name (a skeleton keeps its scores, its full model, its data), and the linear probes and benchmarks made only
from kept folders. A folder younger than --min-age-hours or whose lock
is held is kept too: a running sweep logs its folders to MLflow only at the end. Deleted MLflow runs do not
count; their own artifacts (mlruns/) go with `mlflow gc --backend-store-uri sqlite:///mlflow.db`.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from skeleton.folder import NEURONS
from skeleton.io import MANIFEST, RECORD, file_sha256
from tasks.paths import INPUTS, artifacts_dir, results_dir, stage_folders, tracking_uri as default_uri

KEEP_STAGES = {"nightly"}  # the nightly baseline and history: never collected


def stage_dirs(root: Path) -> list[Path]:
    stages = [s for s in root.iterdir() if s.is_dir() and not s.name.startswith(".") and s.name not in KEEP_STAGES]
    return sorted(p for stage in stages for p in stage.iterdir() if p.is_dir() and not p.name.startswith("."))


def mlflow_references(tracking_uri: str | None = None) -> tuple[list[str], set[str]]:
    """Strings that MLflow runs hold (params, tags, results tables) and the manifest digests of logged models."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient(tracking_uri or default_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    strings: list[str] = []
    digests: set[str] = set()
    if not experiments:
        return strings, digests
    with tempfile.TemporaryDirectory() as tmp:
        for run in client.search_runs(experiments, max_results=50_000):
            strings += [*run.data.params.values(), *run.data.tags.values()]
            if "results.parquet" in {f.path for f in client.list_artifacts(run.info.run_id)}:
                table = pd.read_parquet(client.download_artifacts(run.info.run_id, "results.parquet", tmp))
                strings += [v for column in table for v in table[column] if isinstance(v, str)]
    for model in client.search_logged_models(experiments, max_results=50_000):
        strings += [*model.params.values(), *model.tags.values()]
        if "skeleton.manifest" in model.tags:
            digests.add(model.tags["skeleton.manifest"])
    return strings, digests


def _names(folder: Path) -> list[str]:
    """What a stage folder's own records hold: its result, its inputs, a skeleton's record (SkeletonFolder)."""
    found = []
    for name in (RECORD, NEURONS, INPUTS):
        try:
            found.append(json.loads((folder / name).read_text()))
        except (OSError, ValueError):
            pass
    return found


def _locked(folder: Path) -> bool:
    lock = folder.parent / f".{folder.name}.lock"
    if not lock.exists():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def unreferenced(root: Path | None = None, tracking_uri: str | None = None, min_age_hours: float = 24.0) -> list[Path]:
    """The stage folders under `root` (default: the artifacts folder) that gc would remove."""
    root = Path(root or artifacts_dir())
    if not root.is_dir():
        return []
    strings, digests = mlflow_references(tracking_uri)
    folders = stage_dirs(root)
    keep = stage_folders(strings, root)
    keep |= {f for f in folders if (f / MANIFEST).is_file() and file_sha256(f / MANIFEST) in digests}
    queue = list(keep)
    while queue:  # what the kept folders were made from
        for folder in stage_folders(_names(queue.pop()), root) - keep:
            keep.add(folder)
            queue.append(folder)
    for folder in folders:  # a linear probe or a benchmark is named by no other folder: kept with its inputs
        if folder.parent.name in {"probe", "benchmark"} and folder not in keep:
            made_from = stage_folders(_names(folder), root) - {folder}
            if made_from and made_from <= keep:
                keep.add(folder)
    young = time.time() - min_age_hours * 3600
    return [f for f in folders if f not in keep and f.stat().st_mtime < young and not _locked(f)]


def remove(folders: list[Path], root: Path | None = None) -> None:
    """Delete the folders, their lock files, and the Prefect result records that name any of them."""
    root = Path(root or artifacts_dir())
    gone = set(folders)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        (folder.parent / f".{folder.name}.lock").unlink(missing_ok=True)
    results = results_dir(root)
    for record in results.iterdir() if results.is_dir() else []:
        try:
            names = stage_folders(json.loads(json.loads(record.read_text())["result"]), root)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge: the sweep refuses a record it cannot read anyway
        if names & gone:
            record.unlink(missing_ok=True)


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--delete", action="store_true", help="remove them (default: only list them)")
    parser.add_argument("--min-age-hours", type=float, default=24.0,
                        help="keep folders written more recently than this (a running sweep's)")
    parser.add_argument("--artifacts", help="artifacts folder (default: $SKELETON_ARTIFACTS or ./artifacts)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = parser.parse_args(argv)
    if args.min_age_hours < 0:
        raise SystemExit(f"--min-age-hours must be 0 or more, got {args.min_age_hours}")
    root = Path(args.artifacts) if args.artifacts else artifacts_dir()
    found = unreferenced(root, args.tracking_uri, args.min_age_hours)
    sizes = {f: size(f) for f in found}
    for folder, n in sizes.items():
        print(f"{n / 2**20:10.1f} MiB  {folder}")
    total = sum(sizes.values()) / 2**20
    if args.delete:
        remove(found, root)
    verb = "removed" if args.delete else "unreferenced (run with --delete to remove)"
    print(f"{len(found)} folders, {total:.1f} MiB {verb}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
