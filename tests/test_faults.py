"""Faults: a sweep killed anywhere resumes, two at once share the work, the cache refuses what it cannot trust, and
the `skeleton sweep` command killed by a signal leaves nothing running.

The kill tests run sweeps in their own processes (tests/sweep_runner.py) against this session's Prefect server,
each killed with SIGKILL at a failpoint (skeleton.io.failpoint); their tables are compared with an uninterrupted
sweep run here, on its own artifacts folder. The command's own tests run `skeleton sweep` itself, with the Prefect
server it starts, in a session of its own, and send it signals.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import sweep_args, sweep_options
from tasks.queries import IS_SWEEP

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["prepare-data", "tune-prompt", "evaluate", "linear-probe", "attribute", "teacher-logits", "build-skeleton",
         "benchmark-latency"]
# The heavy task runs (and stage folders) of args' sweep: data, probe, the full model, attribution, teacher
# logits, one skeleton, its evaluation and the full model's and probe's, the benchmark.
HEAVY_RUNS = 9
MEASURED = re.compile(r"speedup(?!_bound)|bound_ratio|latency|throughput")  # speed: differs between runs
PLACES = ["path", "logits", "data", "model"]  # folders under each run's own artifacts root
# One failpoint per stage, in the order the sweep reaches them: each run of the chain resumes the one killed
# before it and dies at the next point.
CHAIN = [
    ("rename:data", "data prep: the data folder is written, not yet renamed into place"),
    ("end:tune-prompt", "prompt tuning: the model is exported, Prefect has not stored the result"),
    ("rename:scores", "attribution: the scores are written, not yet renamed into place"),
    ("rename:skeletons", "skeleton build and export: the skeleton is written, not yet renamed into place"),
    ("rename:eval", "evaluation of the skeleton: the logits are written, not yet renamed into place"),
    ("start:benchmark-latency", "benchmark: about to measure"),
    ("mlflow:set_terminated", "MLflow logging: the first child run finished, the rest not logged"),
]


def args(backbone, data_file):
    return sweep_args(backbone, data_file, methods=["grad_x_act"], experiment="faults")


def comparable(records) -> pd.DataFrame:
    table = pd.DataFrame(records)
    return table.drop(columns=[c for c in table if MEASURED.match(c) or c in PLACES + ["kept_widths", "kept_heads"]]
                      ).reset_index(drop=True)


@pytest.fixture(scope="module")
def runner(prefect_server, tmp_path_factory):
    """Runs sweeps in forked processes of one runner (tests/sweep_runner.py): a list of runs at once, each
    {"kwargs", "failpoint"}; returns (exit code, output, results path) per run."""
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "SKELETON_ARTIFACTS": str(folder / "artifacts"), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "sweep_runner.py")], cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    count = iter(range(10**6))

    def run(*runs: dict) -> list[tuple[int, str, Path]]:
        paths = [folder / f"run{next(count)}" for _ in runs]
        request = [{**r, "log": f"{p}.log", "results": f"{p}.parquet"} for r, p in zip(runs, paths)]
        process.stdin.write(json.dumps({"runs": request}) + "\n")
        process.stdin.flush()
        codes = json.loads(process.stdout.readline())["codes"]
        return [(code, Path(f"{p}.log").read_text(), Path(f"{p}.parquet")) for code, p in zip(codes, paths)]

    run.artifacts = folder / "artifacts"
    yield run
    process.stdin.close()
    process.wait(timeout=60)


def computed(output: str) -> list[str]:
    """The stage folders a run computed (skeleton.pipeline logs each), in order."""
    return re.findall(r": computing (\S+)", output)


def leftovers(artifacts: Path) -> list[Path]:
    """Scratch folders of interrupted writes (atomic_dir's .tmp-/.old-) still lying around."""
    return [p for p in artifacts.glob("*/.*-*") if p.is_dir()]


def heavy_states(flow_run_id) -> Counter:
    """(task, final state) counts of a flow run's heavy stages, once the server has all HEAVY_RUNS."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:  # task states reach the server asynchronously, shortly after the flow returns
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = [(run.name.rsplit("-", 1)[0], run.state.name) for run in runs if run.state.is_final()]
            heavy = Counter(state for state in states if state[0] in HEAVY)
            if sum(heavy.values()) >= HEAVY_RUNS or time.monotonic() > deadline:
                return heavy
            time.sleep(0.5)


def assert_intact(artifacts: Path):
    from skeleton.io import read_stage_record

    folders = [p for p in artifacts.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert folders and all(read_stage_record(p) is not None for p in folders), "an unfinished stage folder"
    assert not leftovers(artifacts)


@pytest.fixture(scope="module")
def reference(prefect_server, tiny_backbone_dir, reviews_csv):
    """The uninterrupted sweep, run in this process (the session's artifacts folder)."""
    from flows.sweep import full_sweep

    return pd.DataFrame(full_sweep(**args(tiny_backbone_dir, reviews_csv)))


def test_killed_at_every_stage_resumes_with_the_same_table(reference, runner, tiny_backbone_dir, reviews_csv):
    kwargs, artifacts = args(tiny_backbone_dir, reviews_csv), runner.artifacts
    history: list[str] = []  # every stage folder computed, over the whole chain
    previous = ""
    for failpoint, where in CHAIN:
        [(code, output, _)] = runner({"kwargs": kwargs, "failpoint": failpoint})
        assert code == -9, f"not killed at {failpoint} ({where}):\n{output[-3000:]}"
        now = computed(output)
        # Nothing finished before is computed again: only the folder killed before its rename is redone, and a
        # stage killed after its work (before Prefect stored the result) is taken from its folder.
        assert [f for f in now if f in history] == (history[-1:] if previous.startswith("rename:") else []), now
        if previous.startswith("end:"):
            assert f"reusing the finished stage folder {history[-1]}" in output
        if failpoint.startswith("rename:"):
            assert leftovers(artifacts), f"{failpoint}: a half-written folder should be lying there"
        history += now
        previous = failpoint
    [(code, output, results)] = runner({"kwargs": kwargs})
    assert code == 0, output[-3000:]
    history += computed(output)
    # Each folder computed once, plus a second time for each of the four folders killed before their rename.
    counts = Counter(history)
    assert sorted(counts.values()) == [1] * (len(counts) - 4) + [2] * 4, counts
    assert_intact(artifacts)
    # The last run reused every heavy stage the chain had finished: all of them (only MLflow logging was left).
    states = heavy_states(re.search(r"flow run id (\S+)", output).group(1))
    assert sum(states.values()) == HEAVY_RUNS and {state for _, state in states} == {"Cached"}, states
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(results)), comparable(reference), check_dtype=False)
    assert_tracked_once(artifacts)


def assert_tracked_once(artifacts: Path):
    """MLflow after the chain: one FINISHED sweep run with one FINISHED child run per model; every killed attempt
    that had started its run is KILLED (none left RUNNING), closed by the one that finished."""
    import mlflow

    from tasks.tracking import child_runs

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                              f"{IS_SWEEP} and params.artifacts = '{artifacts}'")
    *attempts, finished = sorted(runs, key=lambda run: run.info.start_time)
    # every attempt but the first, killed while preparing the data, before the sweep's run starts
    assert len(attempts) == len(CHAIN) - 1 and {run.info.status for run in attempts} == {"KILLED"}
    assert finished.info.status == "FINISHED"
    assert {run.data.tags["skeleton.finished_by"] for run in attempts} == {finished.info.run_id}
    children = child_runs(client, finished)
    assert sorted(c.data.tags["skeleton.kind"] for c in children) == ["point", "reference"]
    assert {c.info.status for c in children} == {"FINISHED"}


def test_two_sweeps_at_once_share_the_work(reference, runner, tiny_backbone_dir, reviews_csv, tmp_path):
    import mlflow

    # The same data under another name: fresh stage folders in the runner's artifacts folder, for both sweeps.
    copy = tmp_path / "copy" / reviews_csv.name
    copy.parent.mkdir()
    copy.write_bytes(reviews_csv.read_bytes())
    kwargs = {**args(tiny_backbone_dir, copy), "experiment": "concurrent"}
    runs = runner({"kwargs": kwargs}, {"kwargs": kwargs})
    for code, output, _ in runs:
        assert code == 0, output[-3000:]
    both = computed(runs[0][1]) + computed(runs[1][1])
    assert len(both) == len(set(both)) == HEAVY_RUNS, both  # each stage folder computed once, by one of them
    assert_intact(runner.artifacts)
    for _, _, results in runs:
        pd.testing.assert_frame_equal(comparable(pd.read_parquet(results)), comparable(reference), check_dtype=False)
    client = mlflow.MlflowClient()
    sweeps = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id], IS_SWEEP)
    assert [run.info.status for run in sweeps] == ["FINISHED", "FINISHED"]


def stored_records() -> list[Path]:
    from tasks.paths import results_dir

    return sorted(p for p in results_dir().iterdir() if p.is_file())


def rerun(tiny_backbone_dir, reviews_csv):
    from flows.sweep import full_sweep

    state = full_sweep(**args(tiny_backbone_dir, reviews_csv), return_state=True)
    return comparable(state.result()), heavy_states(state.state_details.flow_run_id)


class Tamper:
    """What an attacker would store: unpickling it touches a file (it could run anything)."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_result_records_are_json_and_a_tampered_one_is_refused(reference, tiny_backbone_dir, reviews_csv, tmp_path):
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    from tasks.paths import stage_folders

    ours = stage_folders(reference.to_dict("records"))
    records = []
    for path in stored_records():  # plain JSON, all the way down
        stored = json.loads(path.read_text())
        assert stored["metadata"]["serializer"]["type"] == "json"
        named = stage_folders(json.loads(stored["result"]))
        if named and named <= ours:  # other tests' sweeps may share a stage (the same full model) with this one
            records.append(path)
    assert len(records) == 6  # the reference sweep's that name a folder of its table: not attribution, teacher, probe
    # Replace them with a pickled payload, as whoever can write the artifacts folder could.
    marker = tmp_path / "executed"
    for path in records:
        evil = ResultRecord(metadata=ResultRecordMetadata(storage_key=str(path), serializer=PickleSerializer()),
                            result=Tamper(marker))
        path.write_bytes(evil.serialize())
    ResultRecord.deserialize(records[0].read_bytes())  # the attack is real: Prefect's own reader runs it...
    assert marker.exists()
    marker.unlink()
    table, states = rerun(tiny_backbone_dir, reviews_csv)
    assert not marker.exists()  # ...the sweep refused every record unread, and took the stages from their folders
    assert {name for name, state in states if state != "Completed"} <= {"linear-probe", "attribute", "teacher-logits"}
    pd.testing.assert_frame_equal(table, comparable(reference), check_dtype=False)
    for path in records:  # stored again, as JSON
        assert json.loads(path.read_text())["metadata"]["serializer"]["type"] == "json"


def test_cache_hit_on_a_missing_or_corrupt_folder_recomputes_it(reference, tiny_backbone_dir, reviews_csv):
    from skeleton.folder import SkeletonFolder
    from skeleton.io import ArtifactError

    table, states = rerun(tiny_backbone_dir, reviews_csv)
    assert states[("build-skeleton", "Cached")] == 1
    full, skeleton = (Path(p) for p in reference["path"].dropna())
    weights = skeleton / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="corrupt.*re-run the sweep"):  # what the message says to do...
        SkeletonFolder(skeleton).load()
    shutil.rmtree(full)
    table, states = rerun(tiny_backbone_dir, reviews_csv)  # ...works: both stages are rebuilt, the rest cached
    assert states[("tune-prompt", "Completed")] == 1 and states[("build-skeleton", "Completed")] == 1, states
    assert states[("prepare-data", "Cached")] == 1 and states[("attribute", "Cached")] == 1, states
    SkeletonFolder(skeleton).load()
    SkeletonFolder(full).load()
    pd.testing.assert_frame_equal(table, comparable(reference), check_dtype=False)


def test_no_pickle_in_what_a_sweep_or_a_server_runs():
    """Stored state is read as JSON, Parquet, Arrow or safetensors only: no pickle loader in the code."""
    loaders = re.compile(r"import pickle|pickle\.loads?\(|cloudpickle|import dill|joblib|read_pickle|torch\.load\(|"
                         r"allow_pickle=True|trust_remote_code=True")
    found = [f"{path.relative_to(ROOT)}:{n}" for folder in ("skeleton", "tasks", "flows")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if loaders.search(line)]
    assert found == []


# ---- the `skeleton sweep` command, ended by a signal: its own handlers and its own Prefect server ---------------

def session(sid: int) -> list[int]:
    """The live processes of session `sid` (a zombie has ended: only its exit status is left to collect)."""
    def alive_in_session(process):
        try:
            return os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE
        except (OSError, psutil.Error):  # gone meanwhile
            return False
    return [process.pid for process in psutil.process_iter() if alive_in_session(process)]


class Command:
    """`skeleton sweep OPTIONS` in a session of its own, its output collected as it comes."""

    def __init__(self, options: list[str], env: dict[str, str]):
        self.process = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep", *options], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self.lines.extend, args=(self.process.stdout,), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            assert self.process.poll() is None and time.monotonic() < deadline, f"no {pattern!r}:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def processes(self) -> list[int]:
        """Every process of its session: the command's and whatever it started (its server too)."""
        return session(self.process.pid)

    def port(self) -> int | None:
        found = re.search(r"Prefect server for this sweep: http://127\.0\.0\.1:(\d+)", self.output)
        return found and int(found.group(1))

    def end(self, signum: int) -> int:
        """Send `signum` to the command (not to its group); its exit code, once nothing of it is left."""
        self.process.send_signal(signum)
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.processes(), f"still running 10 s after {signum!r}:\n{self.output[-3000:]}"
        code = self.process.wait()
        if self.port():  # nothing listens where its server did
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", self.port()), timeout=2)
        return code


def sweeps(experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient()
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_the_command_ended_by_a_signal_leaves_nothing_running_and_resumes(tiny_backbone_dir, reviews_csv, tmp_path):
    """SIGTERM in its first seconds, SIGHUP as its server starts, SIGTERM and SIGKILL while it trains: within 10 s no
    process of it is left, its server included, and nothing listens on its server's port; the run a signal ended is
    KILLED in MLflow; then the same command finishes, reusing the stages the killed attempts had finished."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SKELETON_ARTIFACTS": str(tmp_path / "artifacts"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the command starts its own server
    options = sweep_options(args(tiny_backbone_dir, reviews_csv) | {"experiment": "signals"})
    training = r"step 1/\d+"

    command = Command(options, env)
    time.sleep(1.5)  # importing
    # 130 as a rule; -15 before the command's handlers are in place; 143 when an import swallowed the interrupt and
    # the watchdog ended the command; -2 now and then: CPython, after a clean exit (atexit ran), ends a process that
    # caught an interrupt during its imports by SIGINT all the same
    assert command.end(signal.SIGTERM) in (130, -signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT)

    # From here on 130, or 128 + the signal where a busy machine made the cleanup outlast the watchdog's grace (CI saw
    # 143 once): what must hold (nothing left, the port free, the run closed, the rerun resuming) holds either way
    command = Command(options, env)
    command.wait_for("Prefect server for this sweep")
    assert command.end(signal.SIGHUP) in (130, 128 + signal.SIGHUP)

    command = Command(options, env)
    command.wait_for(training)
    assert command.end(signal.SIGTERM) in (130, 128 + signal.SIGTERM)
    assert [run.info.status for run in sweeps("signals")] == ["KILLED"]  # closed by the command itself

    command = Command(options, env)
    command.wait_for(training)
    assert command.end(signal.SIGKILL) == -signal.SIGKILL
    assert "/data/" not in " ".join(computed(command.output))  # resumed: the data prepared before

    command = Command(options, env)
    assert command.process.wait(timeout=300) == 0, command.output[-3000:]
    assert not [f for f in computed(command.output) if re.search("/(data|probe)/", f)], computed(command.output)
    runs = sweeps("signals")
    assert not [run for run in runs if run.info.status == "RUNNING"]
    # the SIGKILLed attempt, which could not close its run, is closed by the one that finished
    assert sorted(run.info.status for run in runs if run.data.tags["skeleton.kind"] == "sweep") == [
        "FINISHED", "KILLED", "KILLED"]


def test_a_cleanup_that_hangs_is_cut_short():
    """After a signal the command exits by itself, whatever hangs (Prefect's event worker retrying a stopped server
    did, for minutes): the watchdog kills the servers it started and ends the process."""
    code = """
        import subprocess, time
        from flows import server
        server.GRACE_SECONDS = 1
        server._servers.add(subprocess.Popen(["sleep", "60"]))  # a server that would outlive us
        with server.ended_by_signals():
            try:
                print("ready", flush=True)
                time.sleep(60)
            except KeyboardInterrupt:
                time.sleep(60)  # a cleanup that hangs
    """
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline() == "ready\n"
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 128 + signal.SIGTERM and time.monotonic() - start < 5
    assert "exiting now" in process.stderr.read()
    time.sleep(0.5)
    assert session(process.pid) == []  # the "server" too
