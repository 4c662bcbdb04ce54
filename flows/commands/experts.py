"""Serve task experts of one backbone: list the experts available, classify texts with one of them.

    skeleton list                                   # skeletons of the sweep (artifacts/skeletons)
    skeleton list --skeletons DIR [DIR ...]         # folders of skeletons, or skeleton folders
    skeleton list --mlflow [--experiment skeleton]  # skeletons logged by sweeps to MLflow
    skeleton list --run RUN_ID                      # one sweep's (parent run) or one point's
    skeleton classify --task NAME "a gripping film" "dull and far too long"
    echo "a gripping film" | skeleton classify --task NAME [--json]

An expert is named <task>-<method>-p<rate> (the folder name for skeletons exported before the task was
recorded); --task also accepts a bare task name when only one expert has it. The backbone is the one the
skeleton records, or --backbone. MLflow: --tracking-uri, default $MLFLOW_TRACKING_URI or the sweep's mlflow.db.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class Entry:
    name: str
    source: str  # a skeleton folder, or models:/<model id> (the point's LoggedModel)
    meta: dict
    run_id: str | None = None


def folder_entries(paths: list[str]) -> list[Entry]:
    from skeleton.folder import SkeletonFolder

    return [Entry(folder.name(), str(folder), folder.meta()) for folder in SkeletonFolder.find(paths)]


def mlflow_entries(tracking_uri: str, run_id: str | None, experiment: str | None) -> list[Entry]:
    """Child runs of sweeps (tag skeleton.kind=point), each with its skeleton logged as a model (skeleton.model_id)."""
    import mlflow

    from skeleton.folder import model_name
    from tasks.queries import IS_POINT
    from tasks.tracking import child_runs

    client = mlflow.MlflowClient(tracking_uri)
    if run_id:
        run = client.get_run(run_id)
        if run.data.tags.get("skeleton.kind") == "point":
            runs = [run]
        else:
            runs = child_runs(client, run, IS_POINT)
    else:
        if experiment:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise SystemExit(f"serve: no MLflow experiment {experiment!r} at {tracking_uri}")
            ids = [found.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, IS_POINT) if ids else []
    parents: dict[str, dict] = {}
    entries = []
    for run in runs:
        if run.info.status != "FINISHED" or "skeleton.model_id" not in run.data.tags:
            continue
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id and parent_id not in parents:
            parents[parent_id] = client.get_run(parent_id).data.params
        params = {**parents.get(parent_id, {}), **run.data.params}
        meta = {"task": params.get("task"), "method": params.get("method"), "rate": float(params.get("rate", 0.0)),
                "backbone": params.get("backbone"), "kept_width": params.get("kept_width"),
                "val_accuracy": run.data.metrics.get("val_accuracy")}
        entries.append(Entry(model_name(meta, run.info.run_id), f"models:/{run.data.tags['skeleton.model_id']}",
                             meta, run.info.run_id))
    return entries


def entries(args) -> list[Entry]:
    use_mlflow = args.mlflow or args.run
    paths = args.skeletons
    if paths is None and not use_mlflow:
        from tasks.paths import artifacts_dir

        paths = [str(artifacts_dir() / "skeletons")]
    found = folder_entries(paths or [])
    if use_mlflow:
        from tasks.tracking import tracking_uri

        for run_id in args.run or [None]:
            found += mlflow_entries(args.tracking_uri or tracking_uri(), run_id, args.experiment)
    return found


def widths(meta: dict) -> str:
    w = meta.get("kept_widths") or ([int(meta["kept_width"])] if meta.get("kept_width") else [])
    return "" if not w else str(w[0]) if len(set(w)) == 1 else f"{min(w)}-{max(w)}"


def cmd_list(args) -> int:
    found = entries(args)
    if not found:
        print("no experts found", file=sys.stderr)
        return 1
    names = [e.name for e in found]
    rows = [(e.name + (" (duplicate name)" if names.count(e.name) > 1 else ""), f"{e.meta.get('rate', 0.0):g}",
             widths(e.meta), f"{e.meta['val_accuracy']:.4f}" if e.meta.get("val_accuracy") is not None else "",
             str(e.meta.get("backbone") or "?"), e.source) for e in found]
    header = ("expert", "rate", "width", "val_acc", "backbone", "source")
    sizes = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(size) for cell, size in zip(row, sizes)).rstrip())
    return 0


def pick(found: list[Entry], task: str) -> Entry:
    exact = [e for e in found if e.name == task]
    candidates = exact or [e for e in found if e.meta.get("task") == task]
    if len(candidates) == 1:
        return candidates[0]
    listed = ", ".join(sorted({e.name for e in (candidates or found)})) or "(none)"
    why = "matches several experts" if candidates else "is not an expert here"
    raise SystemExit(f"serve: {task!r} {why}; experts: {listed}")


def cmd_classify(args) -> int:
    from skeleton.serve import SkeletonServer
    from skeleton.train import resolve_device

    device = resolve_device(args.device)

    entry = pick(entries(args), args.task)
    backbone = args.backbone or entry.meta.get("backbone")
    if not backbone:
        raise SystemExit(f"serve: expert {entry.name!r} does not record its backbone; pass --backbone NAME_OR_PATH")
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SystemExit("serve: no texts (give them as arguments or one per line on stdin)")
    empty = [i + 1 for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise SystemExit(f"serve: text {empty[0]} is empty: give every text some words")
    with tempfile.TemporaryDirectory() as tmp:
        folder = entry.source
        if entry.run_id:
            import mlflow

            from tasks.mlflow_model import download_skeleton
            from tasks.tracking import tracking_uri

            mlflow.set_tracking_uri(args.tracking_uri or tracking_uri())
            folder = download_skeleton(entry.source, tmp)
        server = SkeletonServer.load(backbone, device=device)
        name = server.add(folder, name=entry.name)
        predictions = server.classify(name, texts, batch_size=args.batch_size)
    for text, p in zip(texts, predictions):
        if args.json:
            print(json.dumps({"task": p.task, "label": p.label, "probabilities": p.probabilities, "text": text}))
        else:
            probs = " ".join(f"{label}={prob:.3f}" for label, prob in p.probabilities.items())
            print(f"{p.label}\t{probs}\t{text}")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "list the experts available"), ("classify", "classify texts with one expert")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--skeletons", nargs="+", metavar="DIR",
                       help="skeleton folders or folders of them (default: the sweep's artifacts/skeletons, "
                            "unless MLflow is asked)")
        p.add_argument("--mlflow", action="store_true", help="also look in the MLflow tracking store")
        p.add_argument("--run", nargs="+", metavar="RUN_ID", help="MLflow run(s): a sweep (parent) or a point")
        p.add_argument("--experiment", help="MLflow experiment to search (default: all)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    classify = sub.choices["classify"]
    classify.add_argument("--task", required=True, help="expert name (see `list`) or a task with one expert")
    classify.add_argument("--backbone", help="backbone name or folder (default: the one the skeleton records)")
    classify.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: the first GPU if torch "
                          "sees one, else the CPU")
    classify.add_argument("--batch-size", type=int, default=32)
    classify.add_argument("--json", action="store_true", help="one JSON object per text")
    classify.add_argument("texts", nargs="*", help="texts to classify (default: one per line on stdin)")
    args = parser.parse_args(argv)
    return cmd_list(args) if args.command == "list" else cmd_classify(args)


if __name__ == "__main__":
    sys.exit(main())
