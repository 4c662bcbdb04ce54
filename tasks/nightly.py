"""Nightly benchmark-regression tasks: the reference workload, its baseline, and the history of nights.

The baseline lives in the MLflow model registry. `promote` registers the full model and a sweep's skeletons (each
already a LoggedModel) as versions of the task's registered model (skeleton-<task>) and points aliases at them:
`baseline-full`, `baseline-p50`, `baseline-p80`, ... (rates in percent). The figures accepted at promotion (accuracy
and speed-up per rate, batch size, length) and the test data (logged once, to a promotion run) are recorded on the
registered model (tag skeleton.baseline). The nightly run reads its models by alias, so a new sweep changes
nothing it measures; only an explicit promotion (or moving an alias) does. `production` is the alias serving
reads (`skeleton serve TASK=@production`: flows/commands/serve.py).

    <artifacts>/nightly/cache/        models and data downloaded from MLflow (by model id / run id)
    <artifacts>/nightly/history.parquet   one row per (night, rate)
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from prefect import task

from skeleton.folder import model_name
from tasks.paths import artifacts_dir
from tasks.results import BENCHMARK_BATCH_SIZE, FULLS, Row, latest_sweep

BASELINE_TAG = "skeleton.baseline"


def nightly_dir() -> Path:
    return artifacts_dir() / "nightly"


def alias_of(rate: float) -> str:
    """baseline-full, baseline-p50, ... (rates in percent)."""
    return "baseline-" + model_name({"rate": rate}, style="slug")


def _model_id(client, folder: str) -> str:
    """The LoggedModel stored for a folder (any experiment): sweeps log every exported model."""
    from tasks.tracking import stored_model

    for experiment in client.search_experiments():
        found = stored_model(client, experiment.experiment_id, folder)
        if found:
            return found
    raise LookupError(f"{folder} was never logged to MLflow as a model: run the sweep that made it")


def register(client, rows: list[Row], alias: str | None = None) -> dict[float, str]:
    """Register the models of `rows` (same task) as versions of the task's registered model, each rate's
    alias pointed at its version (alias_of(rate), or `alias` for all: one row then). Returns rate -> version."""
    from mlflow.exceptions import MlflowException

    from skeleton.stages import INFO
    from tasks.mlflow_model import registered_name

    task_name = json.loads((Path(rows[0].data) / INFO).read_text())["task"]
    name = registered_name(task_name)
    try:
        client.create_registered_model(name, description=f"Promoted models of task {task_name}")
    except MlflowException as e:
        if "already exists" not in str(e).lower():
            raise
    versions = {}
    for r in rows:
        model_id = _model_id(client, r.path)
        version = client.create_model_version(name, f"models:/{model_id}", model_id=model_id, tags={
            "skeleton.rate": str(r.rate), "skeleton.method": r.method, "skeleton.accuracy": str(r.accuracy)})
        client.set_registered_model_alias(name, alias or alias_of(r.rate), version.version)
        versions[r.rate] = version.version
    return versions


def sweep_records(experiment: str, run_id: str | None = None) -> tuple[list[Row], str]:
    """A sweep's rows (tasks.results.latest_sweep), the latest finished sweep's by default; an error naming the fix
    when there is none."""
    found = latest_sweep(experiment, run_id)
    if found is None:
        raise LookupError(f"no finished sweep in MLflow experiment {experiment!r}: run `make sweep` first")
    return found


def first_seed(records: list[Row | dict], method: str) -> tuple[Row, list[Row]]:
    """The `method` skeletons (FFN only) of the first seed, by rate, and the full model of their prompt method: the
    prompt method of the model --max-drop chose, else the first one, if the sweep cut skeletons from several."""
    rows = [Row.of(r) for r in records]
    rows = [r for r in rows if r.seed == rows[0].seed and not r.head_rate]  # several seeds: the first one's
    points = [r for r in rows if r.method == method]
    if not points:
        raise ValueError(f"no {method!r} rows in these results; methods present: {sorted({r.method for r in rows})}")
    prompt = next((r.prompt for r in rows if r.chosen and r.prompt in FULLS), points[0].prompt)
    full = next(r for r in rows if r.method == FULLS[prompt])
    return full, sorted((r for r in points if r.prompt == prompt), key=lambda r: r.rate)


def promote(records: list[Row | dict], method: str = "grad_x_act", source: str = "",
            experiment: str = "skeleton-nightly") -> dict:
    """Make these sweep results the nightly baseline: the full model and the `method` skeletons registered with
    baseline aliases, the accepted figures and the test data recorded. Returns the baseline (read_baseline)."""
    from skeleton.stages import INFO
    from tasks.mlflow_model import registered_name
    from tasks.tracking import client_and_experiment

    full, points = first_seed(records, method)
    client, experiment_id = client_and_experiment(experiment)
    register(client, [full, *points])
    run = client.create_run(experiment_id, run_name="promotion", tags={"skeleton.kind": "promotion"})
    client.log_artifacts(run.info.run_id, full.data, "data")  # the fixed test split, small
    client.set_terminated(run.info.run_id)
    info = json.loads((Path(full.data) / INFO).read_text())
    record = {"promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "source": source,
              "method": method, "full_accuracy": full.accuracy, "batch_size": BENCHMARK_BATCH_SIZE,
              "seq_len": info["max_length"], "data": f"runs:/{run.info.run_id}/data",
              "points": [{"rate": p.rate, "accuracy": p.accuracy, "speedup": p.speedup,
                          "alias": alias_of(p.rate)} for p in points]}
    client.set_registered_model_tag(registered_name(info["task"]), BASELINE_TAG, json.dumps(record))
    return read_baseline()


def promote_for_serving(records: list[Row | dict], rate: float | None, method: str = "grad_x_act",
                        alias: str = "production") -> tuple[Row, str]:
    """Register the first seed's `method` skeleton at `rate` with `alias` (serving reads @production); rate None:
    the model the sweep's --max-drop chose (its first seed's). Returns (the model's row, its version)."""
    from mlflow import MlflowClient

    from tasks.tracking import tracking_uri

    if rate is None:
        chosen = [r for r in map(Row.of, records) if r.chosen][:1]
        if not chosen:
            raise ValueError("this sweep chose no model (it ran without --max-drop): name one with --rate")
    else:
        _, points = first_seed(records, method)
        chosen = [p for p in points if abs(p.rate - rate) < 1e-9]
        if not chosen:
            raise ValueError(f"no {method} skeleton at rate {rate}; rates: {[p.rate for p in points]}")
    return chosen[0], register(MlflowClient(tracking_uri()), chosen, alias)[chosen[0].rate]


def _download(uri: str, folder: Path) -> Path:
    """An MLflow artifact (a model, a run's folder), downloaded once into `folder` (atomically)."""
    import mlflow

    from skeleton.io import atomic_dir

    if not folder.is_dir():
        with atomic_dir(folder) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
    return folder


def read_baseline() -> dict:
    """The latest promoted baseline: accepted figures, and local folders of the models its aliases point at now."""
    from mlflow import MlflowClient

    from tasks.mlflow_model import skeleton_in
    from tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    promoted = [(json.loads(m.tags[BASELINE_TAG]), m.name) for m in client.search_registered_models()
                if BASELINE_TAG in m.tags]
    if not promoted:
        raise FileNotFoundError(f"no benchmark baseline in the MLflow registry at {tracking_uri()}: run a sweep, "
                                "then promote it with `skeleton nightly promote --latest` (docs/operations.md)")
    baseline, name = max(promoted, key=lambda p: p[0]["promoted_at"])
    cache = nightly_dir() / "cache"

    def folder(alias: str) -> str:
        source = client.get_model_version_by_alias(name, alias).source  # models:/<model id>
        return str(skeleton_in(_download(source, cache / source.rsplit("/", 1)[-1])))

    run_id = baseline["data"].removeprefix("runs:/").split("/")[0]
    data = _download(baseline["data"], cache / f"data-{run_id}") / "data"
    return {**baseline, "registered_model": name, "full": folder("baseline-full"), "data_path": str(data),
            "points": [{**p, "model": folder(p["alias"])} for p in baseline["points"]]}


@task(name="measure-reference")
def measure_reference(baseline: dict, repeats: int = 20, device: str = "cpu") -> list[dict]:
    """Tonight's speed-up (interleaved, same process) and test accuracy of every reference skeleton on `device`, at
    the baseline's batch size and sequence length (models as read_baseline found them by alias)."""
    from skeleton import stages
    from skeleton.specs import BenchmarkSpec, EvalSpec

    paths = {p["rate"]: p["model"] for p in baseline["points"]}
    night = nightly_dir() / "runs" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    speed = stages.benchmark(night, BenchmarkSpec(baseline["full"], tuple(paths.values()), (baseline["batch_size"],),
                                                  (baseline["seq_len"],), repeats, device=device))
    speed = {r["model"]: r for r in speed["rows"]}
    measured = []
    for rate, path in paths.items():
        result = stages.evaluate(night / f"p{rate}", EvalSpec(baseline["data_path"], path, device=device))
        measured.append({"rate": rate, "accuracy": result["accuracy"], "speedup": speed[path]["speedup"],
                         "bound_ratio": speed[path]["bound_ratio"]})
    return measured


@task(name="record-night", retries=2, retry_delay_seconds=2)
def record_night(experiment: str, baseline: dict, measured: list[dict], found: list[str], device: str = "cpu") -> str:
    """Append to the history, log the night to MLflow (tagged when it regressed) with the history plot."""
    import tempfile

    import pandas as pd

    from tasks.report import plot_history
    from tasks.tracking import client_and_experiment

    history_path = nightly_dir() / "history.parquet"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = pd.DataFrame([{"night": now, "regression": bool(found), **m} for m in measured])
    history = pd.concat([pd.read_parquet(history_path), rows]) if history_path.is_file() else rows
    tmp_path = history_path.with_suffix(".tmp")
    history.to_parquet(tmp_path, index=False)
    tmp_path.replace(history_path)  # atomic: a crash never loses earlier nights

    from prefect.runtime import flow_run

    client, experiment_id = client_and_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"nightly-{now}",
                            tags={"skeleton.kind": "nightly", "skeleton.regression": str(bool(found)).lower(),
                                  "skeleton.regression_details": "; ".join(found)[:5000],
                                  "skeleton.flow_run_id": str(flow_run.id or "")})  # the Prefect run behind it
    for m in measured:
        client.log_metric(run.info.run_id, f"speedup_p{m['rate']}", m["speedup"])
        client.log_metric(run.info.run_id, f"accuracy_p{m['rate']}", m["accuracy"])
        client.log_metric(run.info.run_id, f"bound_ratio_p{m['rate']}", m["bound_ratio"])
    client.log_param(run.info.run_id, "baseline_promoted_at", baseline["promoted_at"])
    client.log_param(run.info.run_id, "baseline_model", baseline["registered_model"])
    client.log_param(run.info.run_id, "device", device)
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_history(history, Path(tmp) / "speedup_history.png")
        client.log_artifact(run.info.run_id, str(plot))
    client.set_terminated(run.info.run_id, "FAILED" if found else "FINISHED")
    return run.info.run_id
