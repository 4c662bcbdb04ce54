"""Build the multi-task MLflow model (one backbone, a task expert per task) and serve it with `mlflow models serve`.

    skeleton serve promote --latest --rate 0.5     # the latest sweep's p=0.5 skeleton -> @production
    skeleton serve build --out DIR rotten_tomatoes=artifacts/skeletons/<hash> reuters_r8=@production
    mlflow models serve -m DIR --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["task", "text"], "data": [["rotten_tomatoes", "a gripping film"]]}}'

Each TASK=SOURCE names a task expert: SOURCE is a skeleton folder, a model URI (models:/<model id>) or @ALIAS, the
task's registered model (skeleton-<task>) at that alias (`promote` sets it: an explicit command, like the
nightly baseline's `skeleton nightly promote`). The tracking store is $MLFLOW_TRACKING_URI, else the sweep's mlflow.db. `--log NAME` logs the model to
MLflow instead (a LoggedModel, registered as NAME) so `mlflow models serve -m models:/NAME/1` serves it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="save the multi-task model to a folder, or log it with --log")
    build.add_argument("experts", nargs="+", metavar="TASK=SOURCE")
    where = build.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder to save the model to (replaced if it exists)")
    where.add_argument("--log", metavar="NAME", help="log it to MLflow and register it as NAME")
    build.add_argument("--backbone", help="backbone name or folder (default: the one the first expert records)")
    build.add_argument("--experiment", default="skeleton-serving")
    promote = sub.add_parser("promote", help="register a sweep's skeleton as a version of its task's model, aliased")
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow parent run id of a sweep")
    which.add_argument("--latest", action="store_true", help="the latest finished sweep")
    promote.add_argument("--rate", type=float, required=True, help="pruning rate of the skeleton to promote")
    promote.add_argument("--method", default="grad_x_act")
    promote.add_argument("--alias", default="production")
    promote.add_argument("--experiment", default="skeleton", help="MLflow experiment of the sweeps")
    args = parser.parse_args(argv)
    if args.command == "promote":
        from tasks import nightly

        records, run_id = nightly.sweep_records(args.experiment, args.run_id)
        version = nightly.promote_for_serving(records, args.rate, args.method, args.alias)
        print(f"sweep {run_id}: {args.method} p={args.rate} registered as version {version}, alias {args.alias}")
        return 0

    import mlflow

    from tasks.mlflow_model import expert_folder, multitask_model
    from tasks.tracking import client_and_experiment, tracking_uri

    pairs = [e.split("=", 1) for e in args.experts]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise SystemExit(f"mlflow_serve: experts are TASK=SOURCE, got {args.experts}")
    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        experts = {task: expert_folder(task, source, tmp) for task, source in pairs}
        spec = multitask_model(experts, args.backbone)
        if args.out:
            if args.out.exists():
                shutil.rmtree(args.out)
            mlflow.pyfunc.save_model(str(args.out), **spec)
            print(f"saved {args.out} ({', '.join(experts)}): mlflow models serve -m {args.out} --env-manager local "
                  "-h 127.0.0.1 -p 5001")
        else:
            _, experiment_id = client_and_experiment(args.experiment)
            mlflow.set_experiment(experiment_id=experiment_id)
            info = mlflow.pyfunc.log_model(name="multitask", registered_model_name=args.log, **spec)
            print(f"logged {info.model_uri} as {args.log} version {info.registered_model_version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
