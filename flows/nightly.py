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

from prefect import flow

from flows.config import NightlyConfig, flow_parameters
from flows.settings import configure
from tasks import nightly, prefect_ui


class BenchmarkRegression(RuntimeError):
    pass


# Named like the sweep so its deployment reads `skeleton/nightly-benchmark` beside `skeleton/full-sweep`.
@flow(name="skeleton", log_prints=True, result_serializer="json")
@flow_parameters(NightlyConfig)
def nightly_benchmark(**parameters) -> list[dict]:
    from skeleton.regression import Thresholds, regressions
    from skeleton.train import resolve_device

    configure()
    config = NightlyConfig(**parameters)
    device = str(resolve_device(config.device))
    baseline = nightly.read_baseline()
    measured = nightly.measure_reference(baseline, repeats=config.repeats, device=device)
    found = regressions(baseline["points"], measured, Thresholds(config.speedup_drop, config.accuracy_drop))
    run_id = nightly.record_night(config.experiment, baseline, measured, found, device)
    prefect_ui.nightly_verdict(measured, found, run_id)  # on the flow run, in the Prefect UI
    for m in measured:
        print(f"rate {m['rate']}: speedup {m['speedup']:.3f}x, accuracy {m['accuracy']:.4f}")
    if found:
        raise BenchmarkRegression(f"benchmark regression (MLflow run {run_id}): " + "; ".join(found))
    return measured


def promote_from_mlflow(run_id: str | None, method: str, experiment: str = "skeleton") -> dict:
    """Read a sweep's results table from its MLflow parent run and make it the baseline (registry aliases)."""
    records, run_id = nightly.sweep_records(experiment, run_id)
    return nightly.promote(records, method=method, source=f"mlflow run {run_id}")
