"""The multi-task MLflow model over real HTTP: `mlflow models serve` on loopback answers 4 task experts on one
backbone as each exported skeleton does (a mixed batch, grouped by task), and a bad request gets a 400 whose
message names the problem while the server keeps serving."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from experts import folder_probabilities, stage_expert
from flows.commands import mlflow_serve

TASKS = {"alpha": (2, 0.5), "beta": (3, 0.75), "gamma": (4, 0.5), "delta": (2, 0.0)}  # labels, rate (0: full model)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def frame(pairs: list[tuple[str, str]], columns=("task", "text")) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": [list(p) for p in pairs]}}


@pytest.fixture(scope="module")
def experts(tiny_backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-experts")
    return {task: stage_expert(root, str(tiny_backbone_dir), task, labels, rate, seed=i)
            for i, (task, (labels, rate)) in enumerate(TASKS.items())}


@pytest.fixture(scope="module")
def served(experts, tmp_path_factory):
    """The multi-task model built by `skeleton serve build` (flows/commands/mlflow_serve.py) from the folders, served by `mlflow models serve`."""
    model = tmp_path_factory.mktemp("multitask") / "model"
    assert mlflow_serve.main(["build", "--out", str(model), *(f"{t}={f}" for t, f in experts.items())]) == 0
    port = free_port()
    log = open(model.parent / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (model.parent / "serve.log").read_text()[-3000:]
            time.sleep(1)
        yield url + "/invocations"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the uvicorn workers too
        server.wait(timeout=60)
        log.close()


def test_answers_equal_each_exported_skeleton_in_a_mixed_batch(served, experts):
    texts = ["alpha 3: a great dull story", "a moving story", "gamma 9: an awful sharp flat story " * 3, "bold"]
    pairs = [(task, text) for text in texts for task in TASKS]  # tasks interleaved: the server groups them
    status, body = post(served, frame(pairs))
    assert status == 200, body
    answers = body["predictions"]
    assert [a["task"] for a in answers] == [task for task, _ in pairs]
    for task, folder in experts.items():
        expected, labels = folder_probabilities(folder, texts)
        got = [a for a in answers if a["task"] == task]
        for g, p in zip(got, expected):
            assert g["label"] == labels[max(range(len(p)), key=p.__getitem__)]
            assert list(g["probabilities"]) == labels
            assert max(abs(a - b) for a, b in zip(g["probabilities"].values(), p)) <= 1e-5


@pytest.mark.parametrize("body, message", [
    (frame([("omega", "a great story")]), "unknown task(s) 'omega'; served tasks: alpha, beta, delta, gamma"),
    (frame([("a great story",)], columns=("text",)), "Model is missing inputs ['task']"),
    (frame([("alpha", "a story"), ("beta", "   ")]), "row 1: field 'text' is empty"),
    (frame([("alpha", "story")] * 257), "request too large: 257 rows, at most 256"),
    (frame([("alpha", "word " * 5000)]), "row 0: text of 25000 characters, at most 20000"),
], ids=["unknown-task", "missing-field", "empty-text", "too-many-rows", "too-long-text"])
def test_bad_requests_get_400_naming_the_problem_and_the_server_keeps_serving(served, body, message):
    status, answer = post(served, body)
    assert status == 400 and message in answer["message"], answer
    status, answer = post(served, frame([("alpha", "a great story")]))
    assert status == 200 and answer["predictions"][0]["task"] == "alpha"


def test_built_from_registry_aliases(experts, tmp_path):
    """`promote` points @production at each task's skeleton; the multi-task model built from the aliases holds
    exactly those skeletons."""
    from mlflow.models import Model

    from skeleton.folder import verify
    from tasks import nightly, tracking

    tracking._client()  # the test store
    parent = tracking.start_sweep_run.fn("serving", {"task": "many", "backbone": "tiny"})
    for i, (task, folder) in enumerate(experts.items()):
        record = {"seed": 0, "method": "grad_x_act", "rate": TASKS[task][1], "head_rate": 0.0, "accuracy": 0.5,
                  "path": folder, "data": str(Path(folder).parent / "data")}
        tracking.log_point.fn(parent, {**record, "point": task})
        assert nightly.promote_for_serving([{**record, "method": "full (prompt tuning)", "rate": 0.0}, record],
                                           record["rate"]) == 1
    model = tmp_path / "model"
    assert mlflow_serve.main(["build", "--out", str(model), *(f"{t}=@production" for t in TASKS)]) == 0
    artifacts = Model.load(str(model)).flavors["python_function"]["artifacts"]
    for task, folder in experts.items():
        assert verify(model / artifacts[f"expert-{task}"]["path"]) == verify(folder)
