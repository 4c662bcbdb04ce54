"""Serving over real HTTP on loopback: `skeleton serve` answers 4 task experts on one backbone as each exported
skeleton does, batches concurrent requests, refuses each bad request with a 400 naming the problem (alone: the
requests batched with it are answered) and keeps serving; a single exported skeleton still serves with
`mlflow models serve`."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from experts import folder_probabilities, stage_expert

TASKS = {"alpha": (2, 0.5), "beta": (3, 0.75), "gamma": (4, 0.5), "delta": (2, 0.0)}  # labels, rate (0: full model)
TEXTS = ["alpha 3: a great dull story", "a moving story", "gamma 9: an awful sharp flat story " * 3, "bold"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def frame(pairs: list[tuple[str, ...]], columns=("task", "text")) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": [list(p) for p in pairs]}}


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # the server's whole session: API server and workers too
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def experts(tiny_backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-experts")
    return {task: stage_expert(root, str(tiny_backbone_dir), task, labels, rate, seed=i)
            for i, (task, (labels, rate)) in enumerate(TASKS.items())}


@pytest.fixture(scope="module")
def served(experts, tmp_path_factory):
    """`skeleton serve` of the four experts; a long batch window so that concurrent requests share batches."""
    folder = tmp_path_factory.mktemp("serve")
    port, stats, log = free_port(), folder / "batches.json", folder / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *(f"{t}={f}" for t, f in experts.items()),
                                   "--port", str(port), "--max-batch-size", "8", "--batch-timeout-ms", "50",
                                   "--stats", str(stats)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", server, log)
        yield {"url": url + "/invocations", "stats": stats, "process": server}
    finally:
        stop(server)


def check_answers(answers: list[dict], pairs: list[tuple[str, str]], experts: dict) -> None:
    """Each answer is its task's, with the labels and probabilities (1e-5) of the exported skeleton."""
    assert [a["task"] for a in answers] == [task for task, _ in pairs]
    for task, folder in experts.items():
        mine = [(a, text) for a, (t, text) in zip(answers, pairs) if t == task]
        if not mine:
            continue
        expected, labels = folder_probabilities(folder, [text for _, text in mine])
        for (got, _), p in zip(mine, expected):
            assert got["label"] == labels[max(range(len(p)), key=p.__getitem__)]
            assert list(got["probabilities"]) == labels
            assert max(abs(a - b) for a, b in zip(got["probabilities"].values(), p)) <= 1e-5


def test_answers_equal_each_exported_skeleton_in_a_mixed_request(served, experts):
    pairs = [(task, text) for text in TEXTS for task in TASKS]  # tasks interleaved: the server groups them
    status, body = post(served["url"], frame(pairs))
    assert status == 200, body
    check_answers(body["predictions"], pairs, experts)
    status, body = post(served["url"], {"dataframe_records": [{"task": "beta", "text": TEXTS[1]}]})
    assert status == 200 and body["predictions"][0]["task"] == "beta", body
    status, body = post(served["url"], {"inputs": {"task": ["gamma", "alpha"], "text": TEXTS[:2]}})
    assert status == 200, body
    check_answers(body["predictions"], [("gamma", TEXTS[0]), ("alpha", TEXTS[1])], experts)


def concurrently(url: str, bodies: list) -> list[tuple[int, dict]]:
    answers: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        barrier.wait()
        answers[i] = post(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served, experts):
    before = json.loads(served["stats"].read_text()) if served["stats"].is_file() else {}
    pairs = [(task, f"{text} {i}") for i, (task, text) in enumerate((t, x) for x in TEXTS for t in TASKS)]
    answers = concurrently(served["url"], [frame([pair]) for pair in pairs])
    assert all(status == 200 for status, _ in answers), answers
    check_answers([body["predictions"][0] for _, body in answers], pairs, experts)
    after = json.loads(served["stats"].read_text())
    batched = {int(k): n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    assert sum(k * n for k, n in batched.items()) == len(pairs)
    assert max(batched) > 1, batched  # requests shared forward passes


BAD = [
    (frame([("omega", "a great story")]), "unknown task(s) 'omega'; served tasks: alpha, beta, delta, gamma"),
    (frame([("a great story",)], columns=("text",)), "missing field(s) 'task'"),
    (frame([("alpha", "a story"), ("beta", "   ")]), "row 1: field 'text' is empty"),
    (frame([("alpha", "story")] * 257), "request too large: 257 rows, at most 256"),
    (frame([("alpha", "word " * 5000)]), "row 0: text of 25000 characters, at most 20000"),
    (b'{"dataframe_split": ', "the body is not valid JSON"),
    ({"texts": ["a story"]}, "texts: Extra inputs are not permitted"),
    (frame([("alpha",)]), "dataframe_split row 0 has 1 values for 2 columns"),
]


@pytest.mark.parametrize("body, message", BAD, ids=["unknown-task", "missing-field", "empty-text", "too-many-rows",
                                                    "too-long-text", "not-json", "unknown-format", "short-row"])
def test_bad_requests_get_400_naming_the_problem_and_the_server_keeps_serving(served, body, message):
    status, answer = post(served["url"], body)
    assert status == 400 and message in answer["message"], answer
    status, answer = post(served["url"], frame([("alpha", "a great story")]))
    assert status == 200 and answer["predictions"][0]["task"] == "alpha"


def test_a_bad_request_fails_alone_not_the_batch_it_arrives_with(served, experts):
    good = [("alpha", TEXTS[0]), ("beta", TEXTS[1]), ("gamma", TEXTS[2])]
    answers = concurrently(served["url"], [frame([good[0]]), BAD[0][0], frame([good[1]]), BAD[2][0], frame([good[2]])])
    assert [status for status, _ in answers] == [200, 400, 200, 400, 200]
    check_answers([answers[i][1]["predictions"][0] for i in (0, 2, 4)], good, experts)


def test_two_workers_one_expert_without_task_field_and_sigterm_stops_every_process(experts, tmp_path):
    """Scale-out on one machine: two worker processes (each with its own backbone) behind one port."""
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", experts["beta"], "--port", str(port),
                                   "--workers", "2"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log)
        answers = concurrently(f"http://127.0.0.1:{port}/invocations", [{"inputs": [{"text": t}]} for t in TEXTS * 2])
        assert all(status == 200 for status, _ in answers), answers
        name = answers[0][1]["predictions"][0]["task"]  # a folder without TASK= is named by its neurons.json
        assert name.startswith("beta-grad_x_act-p0.75")
        check_answers([body["predictions"][0] for _, body in answers], [(name, t) for t in TEXTS * 2],
                      {name: experts["beta"]})
        family = [server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))]
        workers = [p for p in family if "multiprocessing.spawn" in " ".join(psutil.Process(p).cmdline())]
        assert len(workers) >= 2, [psutil.Process(p).cmdline() for p in family]  # two inference workers
    finally:
        stop(server)
    deadline = time.time() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in family):
        assert time.time() < deadline, [pid for pid in family if psutil.pid_exists(pid)]
        time.sleep(0.2)


@pytest.mark.parametrize("argv, message", [
    (["alpha=/nonexistent"], "is not a skeleton folder"),
    (["@production"], "give it as TASK=@ALIAS"),
    (["a=/nonexistent", "--workers", "0"], "--workers must be at least 1"),
    (["a=/nonexistent", "--device", "cuda:7"], "device 'cuda:7' asked for, but torch"),
    (["a=/nonexistent", "--device", "cpu", "--execution", "graph"], "'graph' replays CUDA graphs: it needs a CUDA"),
], ids=["not-a-folder", "alias-without-task", "no-workers", "missing-gpu", "graph-on-cpu"])
def test_bad_serve_options_stop_in_one_line(capsys, argv, message):
    from helpers import run_skeleton

    code, _, err = run_skeleton(capsys, "serve", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_served_from_registry_aliases(experts, tmp_path):
    """`promote` points @production at each task's skeleton; `skeleton serve TASK=@production` serves exactly
    those skeletons (downloaded from the registry)."""
    from flows.commands.serve import resolve_experts
    from skeleton.folder import SkeletonFolder
    from tasks import nightly, tracking

    tracking._client()  # the test store
    parent = tracking.start_sweep_run.fn("serving", {"task": "many", "backbone": "tiny"})
    for i, (task, folder) in enumerate(experts.items()):
        record = {"seed": 0, "method": "grad_x_act", "rate": TASKS[task][1], "head_rate": 0.0, "accuracy": 0.5,
                  "path": folder, "data": str(Path(folder).parent / "data"), "chosen": True}
        tracking.log_point.fn(parent, {**record, "point": task})
        full = {**record, "method": "full (prompt tuning)", "rate": 0.0, "chosen": False}
        promoted, version = nightly.promote_for_serving([full, record], record["rate"] if i % 2 else None)  # or --max-drop's
        assert (promoted.path, version) == (folder, 1)
    with pytest.raises(ValueError, match="this sweep chose no model .* name one with --rate"):
        nightly.promote_for_serving([full], None)
    resolved = resolve_experts([f"{task}=@production" for task in TASKS], tmp_path)
    assert sorted(resolved) == sorted(TASKS)
    for task, folder in experts.items():
        assert Path(resolved[task]) != Path(folder) and SkeletonFolder(resolved[task]).verify() == SkeletonFolder(folder).verify()


def test_a_single_skeleton_still_serves_with_mlflow_models_serve(experts, tmp_path):
    import mlflow

    from tasks.mlflow_model import skeleton_model

    model = tmp_path / "model"
    mlflow.pyfunc.save_model(str(model), **skeleton_model(experts["gamma"]))
    port, log = free_port(), tmp_path / "mlflow.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager",
                                   "local", "-h", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", server, log)
        status, body = post(f"{url}/invocations", frame([(t,) for t in TEXTS], columns=("text",)))
        assert status == 200, body
        expected, labels = folder_probabilities(experts["gamma"], TEXTS)
        for got, p in zip(body["predictions"], expected):
            assert got["label"] == labels[max(range(len(p)), key=p.__getitem__)]
            assert max(abs(a - b) for a, b in zip(got["probabilities"].values(), p)) <= 1e-5
        status, body = post(f"{url}/invocations", frame([("  ",)], columns=("text",)))
        assert status == 400 and "row 0: field 'text' is empty" in body["message"], body
    finally:
        stop(server)


def test_load_bench_measures_a_sweeps_served_speed_up_and_logs_it_to_the_sweep(experts, tmp_path):
    """A short `skeleton load-bench --sweep RUN_ID` over a sweep of tiny experts: the sweep's skeletons are the
    experts, the one at --rate alone against its full model; every setup answers without errors at each client
    count, the served and harness speed-ups are reported, and the figures and files land on the sweep's run."""
    import mlflow
    import pandas as pd

    from flows.commands import load_bench
    from tasks import tracking

    run_id = tracking.start_sweep_run.fn("load-bench", {"task": "many", "backbone": "tiny"})
    rows = [{"seed": 0, "prompt": "input", "method": "full (prompt tuning)", "rate": 0.0, "path": experts["delta"]},
            *({"seed": 0, "prompt": "input", "method": "grad_x_act", "rate": TASKS[t][1], "path": experts[t]}
              for t in ("alpha", "beta"))]
    pd.DataFrame(rows).to_parquet(tmp_path / "results.parquet")
    mlflow.MlflowClient().log_artifact(run_id, str(tmp_path / "results.parquet"))
    out = tmp_path / "load"
    with pytest.raises(SystemExit, match="no grad_x_act skeleton at --rate 0.9; its rates: 0.5, 0.75"):
        load_bench.main(["--sweep", run_id, "--rate", "0.9"])
    assert load_bench.main(["--sweep", run_id, "--rate", "0.5", "--task", "rotten_tomatoes", "--clients", "1", "4",
                            "--seconds", "1", "--max-requests", "40", "--rounds", "1", "--harness-repeats", "2",
                            "--out", str(out)]) == 0
    result = json.loads((out / "load.json").read_text())
    assert {(r["setup"], r["clients"]) for r in result["rows"]} == {
        (setup, c) for setup in ("skeleton server, 2 experts", "skeleton alone", "full model") for c in (1, 4)}
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["rss_mib"] > 0 for r in result["rows"])
    assert [s["clients"] for s in result["speedups"]] == [1, 4]
    assert all(s["served_speedup"] > 0 and s["harness_speedup"] > 0 for s in result["speedups"])
    assert result["environment"]["models"] == {
        "experts": {"p0.5": experts["alpha"], "p0.75": experts["beta"]}, "alone": experts["alpha"],
        "full": experts["delta"]}
    assert (out / "load.png").stat().st_size > 0 and "served speed-up" in (out / "load.md").read_text()
    assert f"- alone: {experts['alpha']}\n- full: {experts['delta']}" in (out / "load.md").read_text()
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.metrics["served_speedup_c4"] == pytest.approx(result["speedups"][1]["served_speedup"])
    assert "served_full_model_throughput_c1" in run.data.metrics
    assert {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, "serving")} >= {
        "serving/load.json", "serving/load.png", "serving/load.md"}
