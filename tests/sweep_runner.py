"""Sweeps in their own processes, for the fault and concurrency tests (tests/test_faults.py).

    python tests/sweep_runner.py     # reads requests from stdin, one JSON line each: {"runs": [run, ...]}

The runner imports everything once (torch, transformers, Prefect, MLflow: most of a sweep's start-up), then
forks one child per run of a request, all at once, and answers with their exit codes ({"codes": [...]}; -9:
SIGKILLed). A run is {"kwargs": full_sweep's, "results": Parquet path, "log": path of its output, "failpoint":
SKELETON_FAILPOINT, see skeleton.io.failpoint}. "mlflow:set_terminated" kills a run in MLflow logging, when its
first child run is finished (tasks/tracking.py has no failpoint of its own). Every child sees the library as it
was when the runner started, whatever is edited meanwhile.
"""
import json
import os
import sys
import threading
import traceback

import mlflow
import pandas as pd

import skeleton.stages  # noqa: F401  (torch, transformers, datasets: imported once, before forking)
from flows.sweep import full_sweep
from skeleton.io import failpoint
from tasks.pipeline import library_version

library_version()  # hashed once here: the children's stage keys are those of the library the runner started with

_set_terminated = mlflow.MlflowClient.set_terminated


def set_terminated(self, *args, **kwargs):
    _set_terminated(self, *args, **kwargs)
    failpoint("mlflow:set_terminated")


mlflow.MlflowClient.set_terminated = set_terminated


def child(run: dict) -> None:
    log = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ["SKELETON_FAILPOINT"] = run.get("failpoint", "")
    try:
        state = full_sweep(**run["kwargs"], return_state=True)
        table = pd.DataFrame(state.result()).drop(columns=["kept_widths", "kept_heads"], errors="ignore")
        table.to_parquet(run["results"])
        print(f"flow run id {state.state_details.flow_run_id}", flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all()  # task states reach the server as events: send them before exiting without atexit
    APILogWorker.drain_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    assert threading.active_count() == 1, "forking a process with threads"
    pids = []
    for run in json.loads(line)["runs"]:
        pid = os.fork()
        if pid == 0:
            child(run)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps({"codes": codes}), flush=True)
