"""Nightly benchmark-regression tasks: the reference workload, its baseline, and the history of nights.

    <artifacts>/nightly/baseline/   baseline.json + copies of the accepted models and the test data
    <artifacts>/nightly/history.parquet   one row per (night, rate)

The baseline changes only through `promote` (an explicit command), never as a side effect of a nightly run.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from prefect import task

from tasks.pipeline import BENCHMARK_BATCH_SIZE, artifacts_dir


def nightly_dir() -> Path:
    return artifacts_dir() / "nightly"


def baseline_file() -> Path:
    return nightly_dir() / "baseline" / "baseline.json"


def read_baseline() -> dict:
    path = baseline_file()
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark baseline at {path}: run a sweep, then promote it with "
                                "`skeleton nightly promote --latest` (docs/operations.md)")
    return json.loads(path.read_text())


def promote(records: list[dict], method: str = "grad_x_act", source: str = "") -> dict:
    """Make these sweep results the baseline: copies the full model, the `method` skeletons and the data."""
    from skeleton.io import atomic_dir
    from skeleton.stages import INFO
    from tasks.report import FULL

    seed = records[0].get("seed", 0)  # a sweep over several seeds: its first seed's models are the baseline
    records = [r for r in records if r.get("seed", 0) == seed and not r.get("head_rate")]
    full = next(r for r in records if r["method"] == FULL)
    points = sorted((r for r in records if r["method"] == method), key=lambda r: r["rate"])
    if not points:
        raise ValueError(f"no {method!r} rows in these results; methods present: "
                         f"{sorted({r['method'] for r in records})}")
    with atomic_dir(nightly_dir() / "baseline") as tmp:
        shutil.copytree(full["data"], tmp / "data")
        shutil.copytree(full["path"], tmp / "models" / "full")
        for p in points:
            shutil.copytree(p["path"], tmp / "models" / f"p{p['rate']}")
        seq_len = json.loads((Path(full["data"]) / INFO).read_text())["max_length"]
        baseline = {
            "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "source": source,
            "method": method, "full_accuracy": full["accuracy"], "batch_size": BENCHMARK_BATCH_SIZE,
            "seq_len": seq_len,
            "points": [{"rate": p["rate"], "accuracy": p["accuracy"], "speedup": p["speedup"],
                        "model": f"models/p{p['rate']}"} for p in points],
        }
        (tmp / "baseline.json").write_text(json.dumps(baseline, indent=1))
    return baseline


@task(name="measure-reference")
def measure_reference(baseline: dict, repeats: int = 20) -> list[dict]:
    """Tonight's speed-up (interleaved, same process) and test accuracy of every reference skeleton, at the
    baseline's batch size and sequence length."""
    from skeleton import stages

    root = baseline_file().parent
    paths = {p["rate"]: str(root / p["model"]) for p in baseline["points"]}
    speed = stages.benchmark(str(root / "models" / "full"), list(paths.values()), [baseline["batch_size"]],
                             [baseline["seq_len"]], repeats)
    speed = {r["model"]: r for r in speed["rows"]}
    night = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    measured = []
    for rate, path in paths.items():
        result = stages.evaluate(nightly_dir() / "runs" / night / f"p{rate}", str(root / "data"), path)
        measured.append({"rate": rate, "accuracy": result["accuracy"], "speedup": speed[path]["speedup"],
                         "bound_ratio": speed[path]["bound_ratio"]})
    return measured


@task(name="record-night", retries=2, retry_delay_seconds=2)
def record_night(experiment: str, baseline: dict, measured: list[dict], found: list[str]) -> str:
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

    client, experiment_id = client_and_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"nightly-{now}",
                            tags={"skeleton.kind": "nightly", "skeleton.regression": str(bool(found)).lower(),
                                  "skeleton.regression_details": "; ".join(found)[:5000]})
    for m in measured:
        client.log_metric(run.info.run_id, f"speedup_p{m['rate']}", m["speedup"])
        client.log_metric(run.info.run_id, f"accuracy_p{m['rate']}", m["accuracy"])
        client.log_metric(run.info.run_id, f"bound_ratio_p{m['rate']}", m["bound_ratio"])
    client.log_param(run.info.run_id, "baseline_promoted_at", baseline["promoted_at"])
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_history(history, Path(tmp) / "speedup_history.png")
        client.log_artifact(run.info.run_id, str(plot))
    client.set_terminated(run.info.run_id, "FAILED" if found else "FINISHED")
    return run.info.run_id
