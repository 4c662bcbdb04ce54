"""MLflow stays true: an identical rerun of a sweep stores no model twice (store growth bounded), each point has
one child run whatever the retries, and a rerun closes the runs of an attempt that was killed (a whole sweep killed
at every stage, then finished: tests/test_faults.py)."""
import os
import signal
import subprocess
import sys

import mlflow

from helpers import sweep_args
from tasks import tracking
from tasks.queries import IS_SWEEP


def store_bytes(location: str) -> int:
    root = location.removeprefix("file://")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def points(children) -> list[tuple[str, str, str]]:
    """(seed, method, point) of each skeleton's child run's point key (which may also name the prompt method)."""
    keys = [c.data.tags["skeleton.point"].split("/") for c in children if c.data.tags["skeleton.kind"] == "point"]
    return [(key[0], key[-2], key[-1]) for key in keys]


def test_identical_rerun_stores_nothing_twice(prefect_server, tiny_backbone_dir, reviews_csv):
    from flows.sweep import full_sweep

    args = sweep_args(tiny_backbone_dir, reviews_csv, experiment="rerun")
    full_sweep(**args)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("rerun")
    models = {m.model_id: m.name for m in client.search_logged_models([experiment.experiment_id])}
    assert sorted(models.values()) == ["full", "grad_x_act-p50", "random-p50"]
    before = store_bytes(experiment.artifact_location)
    full_sweep(**args)  # every stage cached
    growth = store_bytes(experiment.artifact_location) - before
    print(f"store: {before} bytes after the first sweep, +{growth} bytes after the identical rerun")
    assert growth < 5 * 2**20 and growth < before / 4, (growth, before)
    assert {m.model_id for m in client.search_logged_models([experiment.experiment_id])} == set(models)
    parents = client.search_runs([experiment.experiment_id], IS_SWEEP)
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    for parent in parents:  # each run refers to the same stored models, one child run per point
        children = tracking.child_runs(client, parent)
        assert sorted(points(children)) == [("seed0", "grad_x_act", "p=0.5 h=0"), ("seed0", "random", "p=0.5 h=0")]
        assert {c.data.tags["skeleton.model_id"] for c in children} == set(models)  # the full model's run too


def test_a_rerun_closes_the_runs_of_a_killed_attempt(tiny_backbone_dir):
    params = {"task": "killed", "backbone": str(tiny_backbone_dir), "rates": [0.5]}
    # An attempt whose process dies (SIGKILL) after creating its parent run and one child run.
    code = ("import os, signal, sys\nfrom tasks import tracking\n"
            f"run = tracking.start_sweep_run.fn('killed', {params!r})\n"
            "client = tracking._client()\n"
            "client.create_run(client.get_run(run).info.experiment_id, tags={'mlflow.parentRunId': run})\n"
            "print(run, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    killed = out.stdout.split()[-1]
    client = mlflow.MlflowClient()
    assert client.get_run(killed).info.status == "RUNNING"
    live = tracking.start_sweep_run.fn("killed", params)  # a live attempt (this process): left alone
    other = tracking.start_sweep_run.fn("killed", {**params, "rates": [0.8]})  # another sweep: left alone
    rerun = tracking.start_sweep_run.fn("killed", params)

    assert tracking.close_killed_attempts(client, rerun) == [killed]
    experiment_id = client.get_run(killed).info.experiment_id
    (child,) = tracking.child_runs(client, client.get_run(killed))
    for run in (client.get_run(killed), child):
        assert run.info.status == "KILLED" and run.data.tags["skeleton.finished_by"] == rerun
    assert {client.get_run(r).info.status for r in (live, other, rerun)} == {"RUNNING"}
    assert tracking.close_killed_attempts(client, rerun) == []  # idempotent
