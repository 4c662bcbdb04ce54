"""The local stack end to end: `skeleton stack up` (twice, after a crash, on a taken port), the nightly cron
schedule, `prefect deployment run skeleton/full-sweep -p ...` run by the worker, its runs in the MLflow server,
and `down` leaving no process behind. Free loopback ports, a temporary state folder; a few minutes."""
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tasks.queries import IS_POINT, IS_SWEEP

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:  # all bound at once, so the ports differ
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def http(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def our_processes(state: Path) -> list[int]:
    """Live processes started by this stack: all of them (flow runs too) carry its PREFECT_HOME."""
    marker = f"PREFECT_HOME={state / 'prefect'}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Stack:
    def __init__(self, state: Path, artifacts: Path):
        self.state = state
        self.prefect_port, self.mlflow_port = free_ports(2)
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = {**os.environ, "SKELETON_ARTIFACTS": str(artifacts), "PREFECT_WORKER_QUERY_SECONDS": "1",
                    "PREFECT_WORKER_PREFETCH_SECONDS": "1"}

    def run(self, command: str, state: Path | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "flows.commands.stack", command, "--state", str(state or self.state),
                "--prefect-port", str(self.prefect_port), "--mlflow-port", str(self.mlflow_port)]
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted((self.state / "logs").glob("*")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), tmp_path_factory.mktemp("stack-artifacts"))
    # A crash left PID files behind that name processes which are gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stack.state / "pids").mkdir()
    for name in ("prefect-server", "worker"):
        (stack.state / "pids" / f"{name}.pid").write_text(f"{dead.pid}\n")
    try:
        stack.first_up = stack.run("up")
        assert stack.first_up.returncode == 0, stack.first_up.stdout + stack.first_up.stderr + stack.logs()
        yield stack
    finally:
        down = stack.run("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not list((stack.state / "pids").glob("*.pid"))
        if Path("/proc/self/environ").exists():
            assert our_processes(stack.state) == []


def test_up_recovers_from_stale_pid_files_and_is_idempotent(stack):
    out = stack.first_up.stdout
    assert "stale PID file" in out
    assert f"export PREFECT_API_URL={stack.api}" in out and f"export MLFLOW_TRACKING_URI={stack.mlflow}" in out
    assert f"http://127.0.0.1:{stack.prefect_port}" in out and stack.mlflow in out

    again = stack.run("up")
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    status = stack.run("status")
    assert status.returncode == 0 and status.stdout.count("running (pid") == 3, status.stdout


def test_everything_listens_on_loopback_only(stack):
    import psutil

    listening = []
    for pid_file in (stack.state / "pids").glob("*.pid"):
        process = psutil.Process(int(pid_file.read_text()))
        for p in [process, *process.children(recursive=True)]:
            listening += [(p.name(), c.laddr.ip) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {ip for _, ip in listening} <= {"127.0.0.1", "::1"}, listening


def test_up_refuses_a_port_in_use(stack, tmp_path):
    clash = stack.run("up", state=tmp_path / "other")
    assert clash.returncode != 0
    assert f"port {stack.prefect_port}" in clash.stderr and "--prefect-port" in clash.stderr, clash.stderr
    assert not list((tmp_path / "other" / "pids").glob("*.pid"))


def test_nightly_benchmark_is_scheduled_nightly_utc(stack):
    deployment = http(f"{stack.api}/deployments/name/skeleton/nightly-benchmark")
    (schedule,) = deployment["schedules"]
    assert schedule["active"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"


def test_a_bad_parameter_fails_the_deployment_run_before_any_work(stack, tiny_backbone_dir, reviews_csv):
    """`prefect deployment run -p` with a rate outside [0, 1): the flow run fails with the one-line message, before
    any MLflow run or stage folder exists."""
    env = {**stack.env, "PREFECT_API_URL": stack.api, "PREFECT_HOME": str(stack.state / "prefect")}
    before = sorted(Path(stack.env["SKELETON_ARTIFACTS"]).rglob("*"))
    run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "skeleton/full-sweep", "-p",
                          f"backbone={tiny_backbone_dir}", "-p", f"data_file={reviews_csv}", "-p", "rates=[0.5, 1.5]",
                          "--watch", "--watch-timeout", "300"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=360)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    state = http(f"{stack.api}/flow_runs/{flow_run_id}")["state"]
    assert run.returncode != 0 and state["type"] == "FAILED", run.stdout + run.stderr + stack.logs()
    assert "pruning rate must be in [0, 1), got 1.5" in state["message"], state["message"]
    experiments = http(f"{stack.mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 100})
    for experiment in experiments.get("experiments", []):
        assert not http(f"{stack.mlflow}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [experiment["experiment_id"]]}).get("runs"), experiment["name"]
    assert sorted(Path(stack.env["SKELETON_ARTIFACTS"]).rglob("*")) == before


def test_full_sweep_deployment_runs_and_is_tracked_in_mlflow(stack, tiny_backbone_dir, reviews_csv):
    params = {"backbone": str(tiny_backbone_dir), "data_file": str(reviews_csv), "text_column": "review",
              "label_column": "sentiment", "rates": "[0.5]", "methods": '["grad_x_act", "random"]',
              "prompt_length": 4, "max_length": 24, "train_steps": 6, "retune_steps": 4, "attribution_examples": 16}
    argv = [sys.executable, "-m", "prefect", "deployment", "run", "skeleton/full-sweep", "--watch",
            "--watch-timeout", "420"]
    for key, value in params.items():
        argv += ["-p", f"{key}={value}"]
    env = {**stack.env, "PREFECT_API_URL": stack.api, "PREFECT_HOME": str(stack.state / "prefect")}
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr + stack.logs()

    experiment = http(f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=skeleton")["experiment"]

    def search(filter_string: str) -> list[dict]:
        runs = http(f"{stack.mlflow}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment["experiment_id"]], "filter": filter_string}).get("runs", [])
        for r in runs:
            r["params"] = {p["key"]: p["value"] for p in r["data"].get("params", [])}
            r["metrics"] = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
        return runs

    (parent,) = search(IS_SWEEP)
    assert parent["params"]["backbone"] == str(tiny_backbone_dir) and parent["params"]["train_steps"] == "6"
    assert {"full_accuracy", "linear_probe_accuracy", "full_parameters"} <= set(parent["metrics"])
    children = search(f"tags.mlflow.parentRunId = '{parent['info']['run_id']}' and {IS_POINT}")
    assert sorted(c["params"]["method"] for c in children) == ["grad_x_act", "random"]
    for child in children:
        assert {"accuracy", "speedup", "parameters", "kept_width", "rate"} <= set(child["metrics"])
    # Each exported model is a LoggedModel in the server's store, with its point's metrics.
    models = http(f"{stack.mlflow}/api/2.0/mlflow/logged-models/search",
                  {"experiment_ids": [experiment["experiment_id"]]})["models"]
    assert sorted(m["info"]["name"] for m in models) == ["full", "prefix-full", "prefix-grad_x_act-p50",
                                                         "prefix-random-p50"]  # the default prompt: prefix
    for model in models:
        assert {"accuracy", "rate"} <= {m["key"] for m in model["data"]["metrics"]}
    stack.sweep_run = parent["info"]["run_id"]


def test_promotion_by_alias_and_the_nightly_deployment_reading_it(stack):
    """`skeleton nightly promote --latest` registers the sweep's models with baseline aliases on the server; the
    nightly deployment reads them by alias, passes, and leaves its verdict in MLflow and as Prefect artifacts."""
    assert hasattr(stack, "sweep_run"), "needs the full-sweep deployment's run (the test above)"
    env = {**stack.env, "PREFECT_API_URL": stack.api, "PREFECT_HOME": str(stack.state / "prefect"),
           "MLFLOW_TRACKING_URI": stack.mlflow}
    promote = subprocess.run([sys.executable, "-m", "flows.cli", "nightly", "promote", "--latest"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert promote.returncode == 0 and stack.sweep_run in promote.stdout, promote.stdout + promote.stderr
    name = "skeleton-file-reviews-csv"
    registered = http(f"{stack.mlflow}/api/2.0/mlflow/registered-models/get?name={name}")["registered_model"]
    assert {a["alias"] for a in registered["aliases"]} == {"baseline-full", "baseline-p50"}

    # Timing of a tiny model on a shared machine is noise: the speed-up threshold is loose, accuracy exact.
    run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "skeleton/nightly-benchmark",
                          "-p", "speedup_drop=0.95", "-p", "accuracy_drop=0.001", "-p", "repeats=5", "--watch",
                          "--watch-timeout", "300"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr + stack.logs()
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    experiment = http(f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=skeleton-nightly")
    nights = http(f"{stack.mlflow}/api/2.0/mlflow/runs/search",  # the schedule may start one too (at 02:00 UTC)
                  {"experiment_ids": [experiment["experiment"]["experiment_id"]],
                   "filter": f"tags.`skeleton.kind` = 'nightly' and tags.`skeleton.flow_run_id` = '{flow_run_id}'"})["runs"]
    assert len(nights) == 1
    night = nights[0]["data"]
    assert {t["key"]: t["value"] for t in night["tags"]}["skeleton.regression"] == "false"
    assert {p["key"]: p["value"] for p in night["params"]}["baseline_model"] == name

    # The Prefect API holds the sweep's three artifacts and the night's verdict.
    artifacts = http(f"{stack.api}/artifacts/filter", {})
    ours = [a for a in artifacts if a.get("key") and (a["key"].startswith("sweep-") or a["flow_run_id"] == flow_run_id)]
    by_key = {a["key"]: a for a in ours}
    assert {"sweep-file-reviews-csv-results", "sweep-file-reviews-csv-summary", "sweep-file-reviews-csv-progress",
            "nightly-verdict", "nightly-measurements"} <= set(by_key), sorted(by_key)
    assert "PASS" in by_key["nightly-verdict"]["data"] and by_key["sweep-file-reviews-csv-progress"]["data"] == 100.0
