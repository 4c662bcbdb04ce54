"""Nightly benchmark regression, as the Prefect flow `nightly-benchmark` (deployed with a cron schedule).

Re-measures the accepted reference skeletons (the baseline) with the same batch size and length every night:
speed-up over the full model measured interleaved in this run (so a slower machine is no regression) and
test accuracy on the fixed split. A drop past a threshold fails the run, naming the metric, the rate and both
values, and tags the MLflow run `skeleton.regression=true`; otherwise the night extends the history.

    skeleton nightly run                      # one night, now
    skeleton nightly promote --latest         # accept the latest sweep's skeletons as the baseline
    skeleton nightly promote --run-id RUN_ID  # ... or a chosen sweep (MLflow parent run id)

Its parameters are the fields of flows.config.NightlyConfig.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "skeleton")
logging.getLogger("skeleton").setLevel(logging.INFO)

from prefect import flow  # noqa: E402

from flows.config import NightlyConfig, flow_parameters  # noqa: E402
from tasks import nightly  # noqa: E402


class BenchmarkRegression(RuntimeError):
    pass


# Named like the sweep so its deployment reads `skeleton/nightly-benchmark` beside `skeleton/full-sweep`.
@flow(name="skeleton", log_prints=True)
@flow_parameters(NightlyConfig)
def nightly_benchmark(**parameters) -> list[dict]:
    from skeleton.regression import Thresholds, regressions

    config = NightlyConfig(**parameters)
    baseline = nightly.read_baseline()
    measured = nightly.measure_reference(baseline, repeats=config.repeats)
    found = regressions(baseline["points"], measured, Thresholds(config.speedup_drop, config.accuracy_drop))
    run_id = nightly.record_night(config.experiment, baseline, measured, found)
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
            raise LookupError(f"no finished sweep in MLflow experiment {experiment!r}: run `make sweep` first")
        run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        records = pd.read_parquet(client.download_artifacts(run_id, "results.parquet", tmp)).to_dict("records")
    return nightly.promote(records, method=method, source=f"mlflow run {run_id}")
