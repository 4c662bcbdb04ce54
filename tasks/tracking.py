"""MLflow logging for a sweep: a parent run per sweep, a child run per (selection method, pruning rate).

Every exported model (the full prompt-tuned model, each skeleton) is an MLflow LoggedModel (pyfunc,
tasks/mlflow_model.py) with its point's metrics linked to it, so the experiment's Models page compares sparsity
levels. A model is stored once per content (SkeletonFolder.digest: its manifest's sha256): a cached point's run
refers to the model already stored for the same folder.

Logging is idempotent: a child run is keyed by its point (tag skeleton.point), so a retried task finds the run it
started instead of creating a second one; a finished sweep closes the parent runs of earlier attempts at the same
sweep that were killed (status KILLED, tag skeleton.finished_by naming the run that did the work).

The active MLflow run is per thread, and Prefect tasks may run on other threads or machines, so every call
names its run id explicitly.

Where users look (docs/mlflow.md): the parent run's description (the first thing its page shows) says what
--max-drop chose and links to the chosen skeleton's run and to the sweep's points compared in the runs table
(compare_view); ui_pages are those links, for the Prefect artifact and the sweep's printed output too.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param
from prefect import task

from tasks.paths import ROOT, tracking_uri
from tasks.queries import IS_CHOSEN, IS_RUNNING
from tasks.results import FINETUNED, FULL_PREFIX, PROBE, Row, main_full


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
        if found.tags.get(EXPERIMENT_KIND) != CUSTOM_MODELS:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, CUSTOM_MODELS)
        return client, found.experiment_id
    return client, client.create_experiment(name, artifact_location=artifact_location(),
                                            tags={EXPERIMENT_KIND: CUSTOM_MODELS})


# What the experiment is, for MLflow's clients. The UI (3.17.2) does not read it: it opens an experiment in its GenAI
# view (a traces overview, a "Detect Issues" pop-up) unless the link asks for the Model training view (ML_VIEW) or
# the user switched to it once in that browser.
EXPERIMENT_KIND, CUSTOM_MODELS = "mlflow.experimentKind", "custom_model_development"
ML_VIEW = "workflowType=machine_learning"


def artifact_location() -> str | None:
    """A local SQLite store keeps artifacts in `mlruns/` beside its database, whatever the working directory
    (MLflow's default, ./mlruns, would follow the caller's); a tracking server decides for itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


@task(name="start-sweep-run", retries=2, retry_delay_seconds=2)
def start_sweep_run(experiment: str, params: dict) -> str:
    """The sweep's parent run, tagged with its sweep key (the parameters' hash: a rerun of the same sweep has the
    same key) and the process that runs it, so a later attempt can tell a killed attempt from a live one."""
    from skeleton.io import stable_hash

    client, experiment_id = client_and_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"sweep-{params['task']}-{params['backbone']}",
                            tags={"skeleton.kind": "sweep", "skeleton.sweep_key": stable_hash(params),
                                  "skeleton.host": socket.gethostname(), "skeleton.pid": str(os.getpid())})
    try:  # a sweep interrupted here must not leave its run RUNNING: the flow only knows of it once it is returned
        client.log_batch(run.info.run_id, params=[Param(key, str(value)[:6000])
                                                  for key, value in {**params, "git_commit": git_commit()}.items()])
    except BaseException as e:
        fail_run(run.info.run_id, e)
        raise
    return run.info.run_id


def _killed(run) -> bool:
    """A RUNNING sweep run whose process is gone (on this host; another host's runs are left alone)."""
    tags = run.data.tags
    if tags.get("skeleton.host") != socket.gethostname() or not tags.get("skeleton.pid", "").isdigit():
        return False
    try:
        os.kill(int(tags["skeleton.pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _children_filter(run_id: str, where: str = "") -> str:
    """The MLflow search filter for the child runs of `run_id`, narrowed by the clause `where` if one is given."""
    children = f"tags.mlflow.parentRunId = '{run_id}'"
    return f"{children} and {where}" if where else children


def child_runs(client: mlflow.MlflowClient, run, where: str = "") -> list:
    """The child runs of `run` (an MLflow Run), those matching the search clause `where` if one is given."""
    return client.search_runs([run.info.experiment_id], _children_filter(run.info.run_id, where))


def close_killed_attempts(client: mlflow.MlflowClient, run_id: str) -> list[str]:
    """Mark earlier attempts at this sweep whose process died KILLED (their running child runs too), each tagged
    skeleton.finished_by = run_id. Returns their run ids."""
    run = client.get_run(run_id)
    key = run.data.tags.get("skeleton.sweep_key")
    if not key:
        return []
    earlier = client.search_runs([run.info.experiment_id], f"tags.`skeleton.sweep_key` = '{key}' and {IS_RUNNING}")
    closed = []
    for other in earlier:
        if other.info.run_id == run_id or not _killed(other):
            continue
        for r in [*child_runs(client, other, IS_RUNNING), other]:
            client.set_tag(r.info.run_id, "skeleton.finished_by", run_id)
            client.set_terminated(r.info.run_id, "KILLED")
        closed.append(other.info.run_id)
    return closed


def benchmark_metrics(rows: list[dict]) -> dict[str, float]:
    """One model's benchmark rows as MLflow metrics named by configuration, e.g. speedup_b32_t64."""
    keys = ("latency_ms", "throughput", "speedup", "speedup_bound", "bound_ratio", "peak_mem_mb")
    return {f"{key}_b{r['batch_size']}_t{r['text_tokens']}": float(r[key]) for r in rows for key in keys
            if r.get(key) is not None}


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def stored_model(client: mlflow.MlflowClient, experiment_id: str, folder: str | Path) -> str | None:
    """The id of the READY LoggedModel already stored for this folder's content, if any."""
    from skeleton.folder import SkeletonFolder

    digest = SkeletonFolder(folder).digest()
    found = client.search_logged_models([experiment_id], f"tags.`skeleton.manifest` = '{digest}'", max_results=10)
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None


def store_model(run_id: str, folder: str | Path, name: str, tags: dict[str, str]) -> str:
    """The folder as a LoggedModel produced by run `run_id`. A folder whose content is already stored is not
    uploaded again: the run refers to that model (a run output)."""
    from skeleton.folder import SkeletonFolder
    from tasks.mlflow_model import skeleton_model

    client = _client()
    experiment_id = client.get_run(run_id).info.experiment_id
    model_id = stored_model(client, experiment_id, folder)
    if model_id is None:
        mlflow.set_tracking_uri(tracking_uri())
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=name, **skeleton_model(folder),
                                           tags={**tags, "skeleton.manifest": SkeletonFolder(folder).digest()})
        model_id = info.model_id
    else:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])
    return model_id


def link_metrics(run_id: str, model_id: str, metrics: dict[str, float]) -> None:
    """`metrics` on run `run_id`, linked to model `model_id`. Log them after every model of the run is stored:
    MLflow's log_model links the run's step-0 metrics logged so far to the model it creates."""
    now = int(time.time() * 1000)
    _client().log_batch(run_id, metrics=[Metric(key, float(value), now, 0, model_id=model_id)
                                         for key, value in metrics.items()])


# A model's figures that --max-drop weighs, linked first: the Models page's chart view draws its metrics in that order.
HEADLINE = ("accuracy", "val_accuracy", "speedup_vs_input")


def _row_metrics(row: Row, keys: tuple[str, ...]) -> dict[str, float]:
    """The row's figures named by `keys`, as MLflow metrics; the ones a row lacks are left out."""
    return {k: float(getattr(row, k)) for k in keys if getattr(row, k) is not None}


@task(name="log-sweep-model", retries=2, retry_delay_seconds=2)
def log_point(parent_run_id: str, row: Row | dict, benchmark_rows: list[dict] = ()) -> str:
    """A child run of the sweep for one model (a sweep point's skeleton, or a reference: a full or the fine-tuned
    model) with its metrics (its benchmark per configuration too), and the model as a LoggedModel with those metrics.
    References get runs of their own too: metrics linked to several models of one run would share its run-level keys,
    and the parent run's `accuracy` would show whichever was logged last. Idempotent: a retry finds the child run of
    the same model and completes it."""
    row = Row.of(row)
    client = _client()
    parent = client.get_run(parent_run_id)
    key = row.key()
    found = child_runs(client, parent, f"tags.`skeleton.point` = '{key}'")
    if any(r.info.status == "FINISHED" for r in found):
        return next(r.info.run_id for r in found if r.info.status == "FINISHED")
    kind = ("reference", "full") if row.is_reference else ("point", "skeleton")  # (the run's, the model's)
    if found:
        run_id = found[0].info.run_id
    else:
        # run names: a point's expert name (grad_x_act-p0.5-seed0); a reference's slug (prefix-full-seed0)
        name = row.name("slug" if row.is_reference else "expert")
        run_id = client.create_run(parent.info.experiment_id, run_name=f"{name}-seed{row.seed}",
                                   tags={"mlflow.parentRunId": parent_run_id, "skeleton.kind": kind[0],
                                         "skeleton.point": key}).info.run_id
    for param in ("prompt", "method", "rate", "head_rate", "seed", "kept_width", "kept_widths", "kept_heads"):
        if getattr(row, param) is not None:
            client.log_param(run_id, param, getattr(row, param))
    metrics = _row_metrics(row, (*HEADLINE, "macro_f1", "speedup", "speedup_bound", "bound_ratio", "bound_vs_input",
                                 "parameters", "kept_width", "rate", "head_rate"))
    metrics["size_mb"] = folder_bytes(row.path) / 2**20
    metrics.update(benchmark_metrics(benchmark_rows))
    tags = {"skeleton.kind": kind[1], "skeleton.method": str(row.method), "skeleton.rate": str(row.rate),
            "skeleton.prompt": str(row.prompt or "input"), "skeleton.head_rate": str(row.head_rate),
            "skeleton.task": parent.data.params.get("task", ""), **_chosen(row)}
    # LoggedModel names allow no dots: rates in percent, e.g. grad_x_act-p65-h25 (a joint budget's 87.5: p87_5)
    model_id = store_model(run_id, row.path, row.name("slug"), tags)
    link_metrics(run_id, model_id, metrics)
    for key, value in {"skeleton.model_id": model_id, **_chosen(row)}.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


def _chosen(row: Row) -> dict[str, str]:
    """The tag of the model --max-drop chose (flows/search.py): what `skeleton promote` takes without --rate."""
    return {"skeleton.chosen": "true"} if row.chosen else {}


def fail_run(run_id: str, error: BaseException) -> None:
    """Close a sweep's parent run and its unfinished child runs, so the MLflow UI never shows a crashed sweep as
    still running: FAILED by an error, KILLED by anything else (a signal: KeyboardInterrupt, Prefect's
    TerminationSignal; an exit)."""
    client = _client()
    status = "FAILED" if isinstance(error, Exception) else "KILLED"
    parent = client.get_run(run_id)
    for run in [*child_runs(client, parent, IS_RUNNING), parent]:
        client.set_terminated(run.info.run_id, status)


@task(name="log-benchmark", retries=2, retry_delay_seconds=2)
def log_benchmark(parent_run_id: str, result: dict, records: list[dict], max_drop: float | None = None) -> None:
    """The latency benchmark on the parent run: its report (benchmark.md / .csv / .json, models named by method
    and rate), the speed-up-vs-rate plot with the arithmetic bound, the accuracy-speed frontier (with --max-drop's
    choice and budget), the full model's latencies as metrics and where it ran as params."""
    from skeleton.benchmark import write_report
    from tasks.report import plot_frontier, plot_speedup

    client = _client()
    rows = [Row.of(r) for r in records]
    main = main_full(rows).path
    names = {r.path: "full" if r.path == main else r.name("label")
             for r in reversed(rows) if r.path}  # reversed: the first seed's name wins
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
        plot_frontier(records, tmp / "accuracy_vs_speedup.png", max_drop)  # the frontier: the sweep's headline plot
        client.log_artifacts(parent_run_id, str(tmp / "benchmark"), "benchmark")
        client.log_artifact(parent_run_id, str(tmp / "speedup_vs_rate.png"))
        client.log_artifact(parent_run_id, str(tmp / "accuracy_vs_speedup.png"))


@task(name="finish-sweep-run", retries=2, retry_delay_seconds=2)
def finish_sweep_run(parent_run_id: str, records: list[dict], summary: list[dict],
                     scores: dict[int, dict[str, str]], report: str = "") -> None:
    """Reference metrics (means over seeds), the per-seed results and the summary (Parquet), the
    accuracy-vs-sparsity plot, the attribution scores, the compare view of the points and the run's description
    (--max-drop's `report`, search.describe, and the links); then earlier killed attempts at this sweep are closed."""
    import pandas as pd

    from tasks.report import plot_accuracy

    client = _client()
    reference = {r["method"]: r for r in summary}
    reference["main"] = reference[main_full(summary).method]
    for prefix, name, keys in (("full", "main", ("accuracy", "accuracy_std", "macro_f1", "parameters")),
                               ("full_prefix", FULL_PREFIX, ("accuracy", "accuracy_std", "speedup_vs_input")),
                               ("finetuned", FINETUNED, ("accuracy", "accuracy_std", "speedup_vs_input")),
                               ("linear_probe", PROBE, ("accuracy", "accuracy_std", "macro_f1"))):
        for key in keys if name in reference else ():
            value = reference[name].get(key)
            if value is not None and value == value:  # a standard deviation over one seed is NaN: not logged
                client.log_metric(parent_run_id, f"{prefix}_{key}", float(value))
    rows = [Row.of(r) for r in records]
    chosen = [r for r in rows if r.chosen]  # a seed's each, with --max-drop
    for key in ("accuracy", "val_accuracy", "speedup_vs_input", "rate") if chosen else ():
        client.log_metric(parent_run_id, f"chosen_{key}", sum(getattr(r, key) or 0.0 for r in chosen) / len(chosen))
    if chosen:
        client.set_tag(parent_run_id, "skeleton.chosen", chosen[0].key())
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
    compare_view(client, parent_run_id)
    links = [f"[{label}]({path})" for label, path in ui_pages(parent_run_id).items() if label != RUN]
    frontier = f"![accuracy vs speed-up](get-artifact?path=accuracy_vs_speedup.png&run_uuid={parent_run_id})"
    # The run page shows its description first, folded after a few lines: the links, then the report, then the plot.
    client.set_tag(parent_run_id, "mlflow.note.content", "\n\n".join([" · ".join(links), report, frontier]))
    close_killed_attempts(client, parent_run_id)
    client.set_terminated(parent_run_id)


# The points' columns in the compare view, in this order: the choice first, then what it weighed.
COMPARED = ("tags.`skeleton.chosen`", *(f"metrics.`{key}`" for key in HEADLINE), "attributes.`Models`")


def compare_view(client: mlflow.MlflowClient, parent_run_id: str) -> None:
    """A view of the runs table that compares the sweep's models: its child runs, fastest first, with COMPARED's
    columns. A link picks a view by its viewStateShareKey (ui_pages); the UI keeps the view itself, as its own
    "Share" button does, in the experiment tag mlflow.sharedViewState.<key>: a URL alone can filter and sort the
    table but not choose its columns. Our key is the parent run's id."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    view = {"searchFilter": _children_filter(parent_run_id), "orderByKey": "metrics.`speedup_vs_input`",
            "orderByAsc": False, "selectedColumns": list(COMPARED), "columnOrder": list(COMPARED)}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{parent_run_id}", json.dumps(view))


RUN, POINTS = "the run", "every model, fastest first"


def ui_pages(run_id: str) -> dict[str, str]:
    """Where to look in the MLflow UI, relative to its root (ui_base), in its Model training view: the run, and for a
    sweep each chosen skeleton's run (by name) and its points compared (compare_view)."""
    client = _client()
    run = client.get_run(run_id)
    experiment = f"#/experiments/{run.info.experiment_id}"
    pages = {RUN: f"{experiment}/runs/{run_id}?{ML_VIEW}"}
    if run.data.tags.get("skeleton.kind") == "sweep":
        for child in child_runs(client, run, IS_CHOSEN):
            pages[f"chosen: {child.info.run_name}"] = f"{experiment}/runs/{child.info.run_id}?{ML_VIEW}"
        pages[POINTS] = f"{experiment}/runs?viewStateShareKey={run_id}&{ML_VIEW}"
    return pages


def ui_base() -> tuple[str, str]:
    """(the MLflow UI's root URL, how to start it: empty on a tracking server). A local store's UI is `mlflow ui`'s."""
    uri = tracking_uri()
    if uri.startswith("http"):
        return uri.rstrip("/"), ""
    return "http://127.0.0.1:5000", f"mlflow ui --backend-store-uri {uri}"
