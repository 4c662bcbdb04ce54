"""MLflow logging for a sweep: a parent run per sweep, a child run per (selection method, pruning rate).

The active MLflow run is per thread, and Prefect tasks may run on other threads or machines, so every call
names its run id explicitly.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import mlflow
from prefect import task

from tasks.pipeline import ROOT


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def client_and_experiment(name: str) -> tuple[mlflow.MlflowClient, str]:
    """The MLflow client and the id of experiment `name`, created on first use."""
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return client, found.experiment_id
    return client, client.create_experiment(name, artifact_location=artifact_location())


def artifact_location() -> str | None:
    """A local SQLite store keeps artifacts in `mlruns/` beside its database, whatever the working directory
    (MLflow's default, ./mlruns, would follow the caller's); a tracking server decides for itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


@task(name="start-sweep-run", retries=2, retry_delay_seconds=2)
def start_sweep_run(experiment: str, params: dict) -> str:
    client, experiment_id = client_and_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"sweep-{params['task']}-{params['backbone']}",
                            tags={"skeleton.kind": "sweep"})
    for key, value in {**params, "git_commit": git_commit()}.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def benchmark_metrics(rows: list[dict]) -> dict[str, float]:
    """One model's benchmark rows as MLflow metrics named by configuration, e.g. speedup_b32_t64."""
    keys = ("latency_ms", "throughput", "speedup", "speedup_bound", "bound_ratio", "peak_mem_mb")
    return {f"{key}_b{r['batch_size']}_t{r['text_tokens']}": float(r[key]) for r in rows for key in keys
            if r.get(key) is not None}


@task(name="log-sweep-point", retries=2, retry_delay_seconds=2)
def log_point(parent_run_id: str, row: dict, benchmark_rows: list[dict] = ()) -> str:
    """A child run with the point's metrics (its benchmark per configuration too) and its exported skeleton."""
    client = _client()
    parent = client.get_run(parent_run_id)
    name = f"{row['method']}-p{row['rate']}" + (f"-h{row['head_rate']}" if row["head_rate"] else "")
    run = client.create_run(parent.info.experiment_id, run_name=f"{name}-seed{row['seed']}",
                            tags={"mlflow.parentRunId": parent_run_id, "skeleton.kind": "point"})
    run_id = run.info.run_id
    for key in ("method", "rate", "head_rate", "seed", "kept_width", "kept_widths", "kept_heads"):
        if row.get(key) is not None:
            client.log_param(run_id, key, row[key])
    for key in ("accuracy", "macro_f1", "speedup", "speedup_bound", "bound_ratio", "parameters", "kept_width", "rate",
                "head_rate", "val_accuracy"):
        if row.get(key) is not None:
            client.log_metric(run_id, key, float(row[key]))
    for key, value in benchmark_metrics(benchmark_rows).items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, row["path"], "skeleton")
    client.set_terminated(run_id)
    return run_id


def fail_run(run_id: str) -> None:
    """Mark a sweep's parent run FAILED, so the MLflow UI never shows a crashed sweep as still running."""
    _client().set_terminated(run_id, "FAILED")


@task(name="log-benchmark", retries=2, retry_delay_seconds=2)
def log_benchmark(parent_run_id: str, result: dict, records: list[dict]) -> None:
    """The latency benchmark on the parent run: its report (benchmark.md / .csv / .json, models named by method
    and rate), the speed-up-vs-rate plot with the arithmetic bound, the full model's latencies as metrics and
    where it ran as params."""
    from skeleton.benchmark import write_report
    from tasks.report import FULL, plot_speedup

    client = _client()
    names = {r["path"]: "full" if r["method"] == FULL else
             f"{r['method']} p={r['rate']:.3g}" + (f" h={r['head_rate']:.3g}" if r["head_rate"] else "")
             for r in reversed(records) if isinstance(r.get("path"), str)}  # reversed: the first seed's name wins
    named = {**result, "rows": [{**r, "model": names.get(r["model"], r["model"])} for r in result["rows"]]}
    env = result["environment"]
    for key in ("device", "device_name", "dtype", "threads", "torch"):
        client.log_param(parent_run_id, f"benchmark_{key}", str(env[key]))
    full = [r for r in named["rows"] if r["model"] == "full"]
    for key in ("latency_ms", "throughput", "peak_mem_mb"):
        for r in full:
            if r.get(key) is not None:
                client.log_metric(parent_run_id, f"full_{key}_b{r['batch_size']}_t{r['text_tokens']}", float(r[key]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_report(named, tmp / "benchmark", title="Sweep latency: full model vs skeletons")
        plot_speedup(records, tmp / "speedup_vs_rate.png")
        client.log_artifacts(parent_run_id, str(tmp / "benchmark"), "benchmark")
        client.log_artifact(parent_run_id, str(tmp / "speedup_vs_rate.png"))


@task(name="finish-sweep-run", retries=2, retry_delay_seconds=2)
def finish_sweep_run(parent_run_id: str, records: list[dict], summary: list[dict],
                     scores: dict[int, dict[str, str]]) -> None:
    """Reference metrics (means over seeds), the per-seed results and the summary (Parquet), the
    accuracy-vs-sparsity plot, the attribution scores and the first seed's full model."""
    import pandas as pd

    from tasks.report import FULL, PROBE, plot_accuracy

    client = _client()
    reference = {r["method"]: r for r in summary if r["method"] in (FULL, PROBE)}
    for prefix, name, keys in (("full", FULL, ("accuracy", "accuracy_std", "macro_f1", "parameters")),
                               ("linear_probe", PROBE, ("accuracy", "accuracy_std", "macro_f1"))):
        for key in keys:
            value = reference[name][key]
            if value == value:  # a standard deviation over one seed is NaN: not logged
                client.log_metric(parent_run_id, f"{prefix}_{key}", float(value))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pd.DataFrame(records).to_parquet(tmp / "results.parquet", index=False)
        pd.DataFrame(summary).to_parquet(tmp / "summary.parquet", index=False)
        plot_accuracy(records, tmp / "accuracy_vs_sparsity.png")
        for name in ("results.parquet", "summary.parquet", "accuracy_vs_sparsity.png"):
            client.log_artifact(parent_run_id, str(tmp / name))
    for seed, by_method in scores.items():
        for method, path in by_method.items():
            client.log_artifact(parent_run_id, path, f"attribution/seed{seed}/{method}")
    client.log_artifacts(parent_run_id, reference[FULL]["path"], "full_model")
    client.set_terminated(parent_run_id)
