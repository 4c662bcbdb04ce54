"""The nightly regression flow: an unchanged rerun passes; a slower reference skeleton fails, named and tagged."""
import json
import shutil

import mlflow
import pytest
from prefect.states import State

from helpers import sweep_args, tiny_bert_config
from skeleton.regression import Thresholds, regressions
from tasks import nightly


def test_regression_rules():
    base = [{"rate": 0.5, "speedup": 2.0, "accuracy": 0.80}]
    assert regressions(base, [{"rate": 0.5, "speedup": 1.85, "accuracy": 0.795}], Thresholds()) == []
    found = regressions(base, [{"rate": 0.5, "speedup": 1.7, "accuracy": 0.78}], Thresholds())
    assert len(found) == 2 and found[0].startswith("speedup at rate 0.5: 1.700x vs baseline 2.000x")
    assert "accuracy at rate 0.5: 0.7800 vs baseline 0.8000" in found[1]
    assert regressions(base, [], Thresholds()) == ["rate 0.5: no measurement tonight"]
    with pytest.raises(ValueError, match="thresholds"):
        Thresholds(speedup_drop=1.5)


@pytest.fixture(scope="module")
def wide_backbone_dir(tmp_path_factory, minilm_tokenizer):
    """A small BERT whose FFN dominates the work, so pruning it gives a clear, measurable speed-up."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide-bert")
    BertModel(tiny_bert_config(hidden_size=64, intermediate_size=8192)).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def test_nightly_passes_unchanged_and_fails_on_a_slower_skeleton(prefect_server, wide_backbone_dir, reviews_csv):
    from flows.nightly import nightly_benchmark
    from flows.sweep import full_sweep

    records = full_sweep(**sweep_args(wide_backbone_dir, reviews_csv, rates=[0.8], methods=["grad_x_act"],
                                      experiment="nightly-source"))
    baseline = nightly.promote(records, source="test")
    assert [p["rate"] for p in baseline["points"]] == [0.8] and baseline["points"][0]["speedup"] > 2.5

    # Tolerances sized for timing noise of a small model on a shared machine; the regression below is ~4x.
    thresholds = dict(speedup_drop=0.5, accuracy_drop=0.01, repeats=30, experiment="nightly-test")
    measured = nightly_benchmark(**thresholds)
    assert measured[0]["accuracy"] == baseline["points"][0]["accuracy"]  # same split, same model

    # Replace the p=0.8 reference skeleton by the (slower) full model.
    root = nightly.baseline_file().parent
    shutil.rmtree(root / "models" / "p0.8")
    shutil.copytree(root / "models" / "full", root / "models" / "p0.8")
    state: State = nightly_benchmark(**thresholds, return_state=True)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "speedup at rate 0.8" in message and "vs baseline" in message

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("nightly-test")
    regressed = client.search_runs([experiment.experiment_id], "tags.`skeleton.regression` = 'true'")
    clean = client.search_runs([experiment.experiment_id], "tags.`skeleton.regression` = 'false'")
    assert len(regressed) == 1 and len(clean) == 1
    assert "speedup at rate 0.8" in regressed[0].data.tags["skeleton.regression_details"]
    assert {"speedup_p0.8", "accuracy_p0.8"} <= set(regressed[0].data.metrics)
    history = json.loads(nightly.baseline_file().read_text())  # promotion is explicit: baseline unchanged
    assert history == baseline
    import pandas as pd

    nights = pd.read_parquet(nightly.nightly_dir() / "history.parquet")
    assert list(nights["regression"]) == [False, True]
