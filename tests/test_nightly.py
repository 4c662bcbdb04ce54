"""The nightly regression flow on the registry: promotion registers the models with baseline aliases, the nightly
run reads them by alias (a new sweep changes nothing it measures), a slower model behind an alias fails the run,
named and tagged; sweep and nightly flow runs carry their results as Prefect artifacts."""
import mlflow
import pandas as pd
import pytest

from helpers import artifacts_of, sweep_args
from skeleton.folder import SkeletonFolder
from skeleton.regression import Thresholds, regressions
from tasks import nightly
from tasks.queries import IS_SWEEP


def test_regression_rules():
    base = [{"rate": 0.5, "speedup": 2.0, "accuracy": 0.80}]
    assert regressions(base, [{"rate": 0.5, "speedup": 1.85, "accuracy": 0.795}], Thresholds()) == []
    found = regressions(base, [{"rate": 0.5, "speedup": 1.7, "accuracy": 0.78}], Thresholds())
    assert len(found) == 2 and found[0].startswith("speedup at rate 0.5: 1.700x vs baseline 2.000x")
    assert "accuracy at rate 0.5: 0.7800 vs baseline 0.8000" in found[1]
    assert regressions(base, [], Thresholds()) == ["rate 0.5: no measurement tonight"]
    with pytest.raises(ValueError, match="thresholds"):
        Thresholds(speedup_drop=1.5)


def test_nightly_reads_the_registry_by_alias_and_fails_on_a_slower_model(prefect_server, wide_backbone_dir,
                                                                          reviews_csv):
    from flows.nightly import nightly_benchmark
    from flows.sweep import full_sweep
    from tasks.mlflow_model import registered_name

    # 30 rounds, as the night below: the median of 5 once read 1.26x for a ~6x skeleton beside another test worker
    state = full_sweep(**sweep_args(wide_backbone_dir, reviews_csv, rates=[0.8], methods=["grad_x_act"],
                                    benchmark_repeats=30, experiment="nightly-source"), return_state=True)
    records = state.result()
    # The sweep's flow run carries the results table, the headline (with the MLflow links) and a finished progress bar.
    sweep_artifacts = artifacts_of(state)
    assert {"table", "markdown", "progress"} <= set(sweep_artifacts)
    assert sweep_artifacts["progress"].data == 100.0
    client = mlflow.MlflowClient()
    [sweep] = client.search_runs([client.get_experiment_by_name("nightly-source").experiment_id], IS_SWEEP)
    headline = sweep_artifacts["markdown"].data
    assert "grad_x_act p=0.8" in headline
    # links that open the UI's Model training view: the run, and its points compared (tasks.tracking.compare_view)
    assert f"/runs/{sweep.info.run_id}?workflowType=machine_learning)" in headline
    assert f"/runs?viewStateShareKey={sweep.info.run_id}&workflowType=machine_learning)" in headline
    table = sweep_artifacts["table"].data
    assert "grad_x_act" in str(table) and "speedup" in str(table)

    baseline = nightly.promote(records, source="test")
    # clearly faster; the bound leaves room for a busy 2-core machine, which measures less than an idle one
    assert [p["rate"] for p in baseline["points"]] == [0.8] and baseline["points"][0]["speedup"] > 1.5
    name = registered_name("file:reviews.csv")
    assert baseline["registered_model"] == name
    aliases = client.get_registered_model(name).aliases
    # (other tests of the session may point @production at the same registered model: the task is the same CSV)
    assert {a for a in aliases if a.startswith("baseline-")} == {"baseline-full", "baseline-p80"}
    skeleton = next(r for r in records if r["method"] == "grad_x_act")  # what the alias serves is what the sweep made
    served, made, full = (SkeletonFolder(p).verify() for p in (baseline["points"][0]["model"], skeleton["path"],
                                                                  baseline["full"]))
    assert served == made != full

    # Tolerances sized for timing noise of a small model on a shared machine; the regression below is ~4x.
    thresholds = dict(speedup_drop=0.5, accuracy_drop=0.01, repeats=30, experiment="nightly-test", device="cpu")
    state = nightly_benchmark(**thresholds, return_state=True)
    measured = state.result()
    assert measured[0]["accuracy"] == baseline["points"][0]["accuracy"]  # same split, same model
    verdict = artifacts_of(state)
    night = verdict["markdown"].data
    assert verdict["markdown"].key == "nightly-verdict" and "PASS" in night
    assert "?workflowType=machine_learning)" in night and "viewStateShareKey" not in night  # no points to compare

    # A new sweep (other rates, same data) logs new models; the aliases and so the measured models do not move.
    full_sweep(**sweep_args(wide_backbone_dir, reviews_csv, rates=[0.5], methods=["grad_x_act"],
                            experiment="nightly-source"))
    assert client.get_registered_model(name).aliases == aliases
    assert nightly.read_baseline()["points"] == baseline["points"]

    # Point the p=0.8 alias at the (slower) full model: the night reads it and fails, naming the metric.
    client.set_registered_model_alias(name, "baseline-p80", aliases["baseline-full"])
    state = nightly_benchmark(**thresholds, return_state=True)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "speedup at rate 0.8" in message and "vs baseline" in message
    verdict = artifacts_of(state)
    assert "REGRESSION" in verdict["markdown"].data and "speedup at rate 0.8" in verdict["markdown"].data

    experiment = client.get_experiment_by_name("nightly-test")
    regressed = client.search_runs([experiment.experiment_id], "tags.`skeleton.regression` = 'true'")
    clean = client.search_runs([experiment.experiment_id], "tags.`skeleton.regression` = 'false'")
    assert len(regressed) == 1 and len(clean) == 1
    assert "speedup at rate 0.8" in regressed[0].data.tags["skeleton.regression_details"]
    assert {"speedup_p0.8", "accuracy_p0.8"} <= set(regressed[0].data.metrics)
    assert regressed[0].data.params["device"] == clean[0].data.params["device"] == "cpu"
    nights = pd.read_parquet(nightly.nightly_dir() / "history.parquet")
    assert list(nights["regression"]) == [False, True]
