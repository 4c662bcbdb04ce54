"""One sweep in its own process, for the fault and concurrency tests (tests/test_faults.py):

    python tests/sweep_runner.py '<full_sweep kwargs as JSON>' results.parquet

SKELETON_FAILPOINT (skeleton.io.failpoint) kills it at a chosen point; "mlflow:set_terminated" kills it in MLflow
logging, when the first child run is finished (tasks/tracking.py has no failpoint of its own).
"""
import json
import sys

import mlflow
import pandas as pd

from skeleton.io import failpoint

_set_terminated = mlflow.MlflowClient.set_terminated


def set_terminated(self, *args, **kwargs):
    _set_terminated(self, *args, **kwargs)
    failpoint("mlflow:set_terminated")


mlflow.MlflowClient.set_terminated = set_terminated

from flows.sweep import full_sweep  # noqa: E402

state = full_sweep(**json.loads(sys.argv[1]), return_state=True)
pd.DataFrame(state.result()).drop(columns=["kept_widths", "kept_heads"], errors="ignore").to_parquet(sys.argv[2])
print(f"flow run id {state.state_details.flow_run_id}", flush=True)
