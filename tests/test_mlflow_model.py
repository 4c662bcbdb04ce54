"""Exported models as MLflow LoggedModels: a fresh process loads one by model URI and predicts what the folder
does; metrics are linked to the model; a folder already stored is never uploaded again; the experiment is tagged
a custom-model one (the UI does not read the tag: its links choose the view, tests/test_flow.py)."""
import json
import os
import subprocess
import sys
import warnings

import mlflow
import pytest
from experts import folder_probabilities, stage_expert
from tasks import tracking

TEXTS = ["alpha 1: a great dull story", "a moving story", "beta 7: an awful flat bold tender sharp funny story " * 3]


@pytest.fixture(scope="module")
def skeleton_dir(tiny_backbone_dir, tmp_path_factory):
    return stage_expert(tmp_path_factory.mktemp("mlflow-model"), str(tiny_backbone_dir), "alpha", 3, 0.5)


def predict_in_fresh_process(uri: str, frame: dict) -> list[dict]:
    code = ("import json, sys, mlflow, pandas as pd\n"
            "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "print('RESULT' + model.predict(pd.DataFrame(json.loads(sys.argv[2]))).to_json(orient='records'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    out = subprocess.run([sys.executable, "-c", code, uri, json.dumps(frame)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT", 1)[1])


def store_bytes(location: str) -> int:
    root = location.removeprefix("file://")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def test_logged_skeleton_predicts_like_its_folder_and_is_stored_once(skeleton_dir, tiny_backbone_dir):
    row = {"seed": 0, "method": "grad_x_act", "rate": 0.5, "head_rate": 0.0, "point": "p=0.5 h=0", "kept_width": 32,
           "accuracy": 0.75, "macro_f1": 0.7, "speedup": 1.4, "speedup_bound": 1.6, "bound_ratio": 0.875,
           "parameters": 1234, "path": skeleton_dir}
    parent = tracking.start_sweep_run.fn("models", {"task": "alpha", "backbone": str(tiny_backbone_dir)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = tracking.log_point.fn(parent, row)
    # every sweep logs its models: MLflow's advice on the predict type hint or a missing example is not for users
    assert not [str(w.message) for w in caught if "predict" in str(w.message) or "input example" in str(w.message)]
    assert tracking.log_point.fn(parent, row) == run_id  # a retry finds its run: no second child
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("models")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(tracking.child_runs(client, client.get_run(parent))) == 1

    model_id = client.get_run(run_id).data.tags["skeleton.model_id"]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run_id and model.name == "grad_x_act-p50"
    # the request a user sends, stored with the model (MLflow served it from the logged copy before storing it)
    logged = mlflow.models.Model.load(f"models:/{model_id}")
    assert list(logged.load_input_example(mlflow.artifacts.download_artifacts(model.artifact_location)).columns) \
        == ["text"]
    linked = {m.key: m.value for m in model.metrics}
    for key in ("accuracy", "macro_f1", "speedup", "speedup_bound", "bound_ratio", "rate", "head_rate",
                "parameters"):
        assert linked[key] == pytest.approx(row[key])
    assert linked["size_mb"] > 0

    # A fresh process, the model URI only: labels and probabilities as the folder's own forward pass.
    expected, labels = folder_probabilities(skeleton_dir, TEXTS)
    got = predict_in_fresh_process(f"models:/{model_id}", {"text": TEXTS})
    assert [g["label"] for g in got] == [labels[max(range(len(p)), key=p.__getitem__)] for p in expected]
    for g, p in zip(got, expected):
        assert list(g["probabilities"]) == labels
        assert max(abs(a - b) for a, b in zip(g["probabilities"].values(), p)) <= 1e-5

    # The same folder from another sweep run (a cached point): the run refers to the stored model, no upload.
    size = store_bytes(experiment.artifact_location)
    again = tracking.start_sweep_run.fn("models", {"task": "alpha", "backbone": str(tiny_backbone_dir)})
    other = tracking.log_point.fn(again, row)
    assert client.get_run(other).data.tags["skeleton.model_id"] == model_id
    assert [o.model_id for o in client.get_run(other).outputs.model_outputs] == [model_id]
    assert store_bytes(experiment.artifact_location) - size < 100_000
    assert len(client.search_logged_models([experiment.experiment_id])) == 1
