"""Nightly benchmark regression, as the Prefect flow `nightly-benchmark` (deployed with a cron schedule).

Re-measures the accepted reference skeletons (the baseline) with the same batch size and length every night:
speed-up over the full model measured interleaved in this run (so a slower machine is no regression) and
test accuracy on the fixed split. A drop past a threshold fails the run, naming the metric, the rate and both
values, and tags the MLflow run `skeleton.regression=true`; otherwise the night extends the history.

    python -m flows.nightly run                      # one night, now
    python -m flows.nightly promote --latest         # accept the latest sweep's skeletons as the baseline
    python -m flows.nightly promote --run-id RUN_ID  # ... or a chosen sweep (MLflow parent run id)
"""
from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "skeleton")
logging.getLogger("skeleton").setLevel(logging.INFO)

from prefect import flow  # noqa: E402

from tasks import nightly  # noqa: E402


class BenchmarkRegression(RuntimeError):
    pass


# Named like the sweep so its deployment reads `skeleton/nightly-benchmark` beside `skeleton/full-sweep`.
@flow(name="skeleton", log_prints=True)
def nightly_benchmark(speedup_drop: float = 0.10, accuracy_drop: float = 0.01, repeats: int = 20,
                      experiment: str = "skeleton-nightly") -> list[dict]:
    from skeleton.regression import Thresholds, regressions

    thresholds = Thresholds(speedup_drop, accuracy_drop)
    baseline = nightly.read_baseline()
    measured = nightly.measure_reference(baseline, repeats=repeats)
    found = regressions(baseline["points"], measured, thresholds)
    run_id = nightly.record_night(experiment, baseline, measured, found)
    for m in measured:
        print(f"rate {m['rate']}: speedup {m['speedup']:.3f}x, accuracy {m['accuracy']:.4f}")
    if found:
        raise BenchmarkRegression(f"benchmark regression (MLflow run {run_id}): " + "; ".join(found))
    return measured


def promote_from_mlflow(run_id: str | None, method: str, experiment: str = "skeleton") -> dict:
    """Read a sweep's results table from its MLflow parent run and make it the baseline."""
    import tempfile

    import pandas as pd

    from tasks.tracking import client_and_experiment

    client, experiment_id = client_and_experiment(experiment)
    if run_id is None:
        runs = client.search_runs([experiment_id], "tags.`skeleton.kind` = 'sweep' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"no finished sweep in MLflow experiment {experiment!r}: run `make sweep` first")
        run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        records = pd.read_parquet(client.download_artifacts(run_id, "results.parquet", tmp)).to_dict("records")
    return nightly.promote(records, method=method, source=f"mlflow run {run_id}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Nightly benchmark regression runs and baseline promotion.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure the reference skeletons now and compare with the baseline")
    run.add_argument("--speedup-drop", type=float, default=0.10, help="relative drop that counts (0.10 = 10%%)")
    run.add_argument("--accuracy-drop", type=float, default=0.01, help="absolute drop that counts (0.01 = 1 point)")
    run.add_argument("--repeats", type=int, default=20)
    promote = sub.add_parser("promote", help="accept a sweep's skeletons as the new baseline")
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow parent run id of a sweep")
    which.add_argument("--latest", action="store_true", help="the latest finished sweep")
    promote.add_argument("--method", default="grad_x_act")
    args = parser.parse_args(argv)
    if args.command == "run":
        nightly_benchmark(args.speedup_drop, args.accuracy_drop, args.repeats)
    else:
        baseline = promote_from_mlflow(args.run_id, args.method)
        print(f"baseline promoted from {baseline['source']}: " +
              ", ".join(f"p={p['rate']} {p['speedup']:.2f}x acc {p['accuracy']:.4f}" for p in baseline["points"]))


if __name__ == "__main__":
    main()
