"""`skeleton promote`: register a sweep's skeleton as a version of its task's model in the MLflow registry, under
an alias (default `production`), the explicit step that decides what `skeleton serve TASK=@production` serves.

    skeleton promote --latest                                # the model the latest sweep's --max-drop chose
    skeleton promote --latest --rate 0.65                    # the latest sweep's grad_x_act p=0.65 -> @production
    skeleton promote --run-id RUN_ID --rate 0.8 --alias canary
    skeleton serve rotten_tomatoes=@production

The registered model is skeleton-<task>; the tracking store is $MLFLOW_TRACKING_URI, else the sweep's mlflow.db.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow parent run id of a sweep")
    which.add_argument("--latest", action="store_true", help="the latest finished sweep")
    parser.add_argument("--rate", type=float, help="pruning rate of the skeleton to promote (default: the model "
                        "the sweep chose with --max-drop)")
    parser.add_argument("--method", default="grad_x_act")
    parser.add_argument("--alias", default="production")
    parser.add_argument("--experiment", default="skeleton", help="MLflow experiment of the sweeps")
    args = parser.parse_args(argv)
    from tasks import nightly

    records, run_id = nightly.sweep_records(args.experiment, args.run_id)
    row, version = nightly.promote_for_serving(records, args.rate, args.method, args.alias)
    print(f"sweep {run_id}: {row.name()} (seed {row.seed}) registered as version {version}, alias {args.alias}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
