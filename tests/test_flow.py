"""The sweep flow end to end on a tiny BERT and a small user CSV: table, exports, MLflow, caching, bad input."""
import dataclasses
import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import TINY_SWEEP, artifacts_of, run_fresh, sweep_args
from skeleton.data import DataError
from tasks.queries import IS_CHOSEN, IS_POINT, IS_REFERENCE, IS_SWEEP


def task_states(flow_run_id, expected=17):
    """(task name, final state name) of a flow run's task runs, once the server has recorded them all."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:  # task states reach the server asynchronously, shortly after the flow returns
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if (len(runs) >= expected and all(r.state.is_final() for r in runs)) or time.monotonic() > deadline:
                return [(run.name.rsplit("-", 1)[0], run.state.name) for run in runs]
            time.sleep(0.5)


def test_sweep_end_to_end_then_cached(prefect_server, tiny_backbone_dir, reviews_csv):
    """With re-tuned normalisation layers, which the exported skeletons must carry."""
    from flows.sweep import full_sweep

    state = full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, retune_norms=True), return_state=True)
    table = pd.DataFrame(state.result())
    assert list(table["method"]) == ["full (prompt tuning)", "linear probe", "grad_x_act", "random"]
    points = table.iloc[2:]
    assert (points["kept_width"] == 32).all() and (points["speedup"] > 0).all()
    assert (points["speedup_bound"] > 1).all()
    assert ((points["bound_ratio"] - points["speedup"] / points["speedup_bound"]).abs() < 1e-9).all()
    assert (points["parameters"] < table.iloc[0]["parameters"]).all()

    # Every exported skeleton reloads in a fresh process with the logits it was evaluated with.
    exports = table.iloc[[0, 2, 3]]  # the full model and the two skeletons (the linear probe exports none)
    files = list(zip(exports["path"], exports["data"], exports["logits"]))
    result = run_fresh(f"""
        import json
        from safetensors.torch import load_file
        from skeleton.folder import SkeletonFolder
        from skeleton.stages import load_data
        from skeleton.train import predict
        found = []
        for path, data, logits in {files!r}:
            model, _, _ = SkeletonFolder(path).load()
            dsd, info = load_data(data)
            diff = (predict(model, dsd["test"], info["pad_id"]) - load_file(logits)["logits"]).abs().max().item()
            found.append({{"diff": diff, "params": model.num_parameters()}})
        print(json.dumps(found))
    """)
    assert [r["diff"] <= 1e-5 for r in result] == [True] * 3
    assert [r["params"] for r in result] == list(exports["parameters"])

    again = full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, retune_norms=True), return_state=True)
    states = dict(task_states(again.state_details.flow_run_id))
    for heavy in ("prepare-data", "tune-prompt", "linear-probe", "attribute", "teacher-logits", "build-skeleton",
                  "evaluate", "benchmark-latency"):
        assert states[heavy] == "Cached", (heavy, states)
    assert pd.DataFrame(again.result()).drop(columns="speedup").equals(table.drop(columns="speedup"))

    # A new rate recomputes only what depends on it.
    more = full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, retune_norms=True, rates=[0.5, 0.75]),
                      return_state=True)
    runs = task_states(more.state_details.flow_run_id, expected=23)
    fresh = {name for name, st in runs if st != "Cached"}
    assert {"prepare-data", "tune-prompt", "linear-probe", "attribute", "teacher-logits"}.isdisjoint(fresh)
    assert {"build-skeleton", "benchmark-latency"} <= fresh
    built = [st for name, st in runs if name == "build-skeleton"]
    assert sorted(built) == ["Cached", "Cached", "Completed", "Completed"]


def test_sweep_is_tracked_in_mlflow(prefect_server, tiny_backbone_dir, reviews_csv):
    import mlflow

    from flows.sweep import full_sweep
    from tasks.results import Row
    from tasks.tracking import child_runs

    records = full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, experiment="tracked", tune_norms=True,
                                      device="cpu"))
    models = [row.path for row in map(Row.of, records) if row.path]  # the probe has none
    for path in models:  # every stage that made a model ran where it was asked to, and its cache key says so
        assert json.loads((Path(path) / "inputs.json").read_text())["device"] == "cpu", path
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tracked")
    parents = client.search_runs([experiment.experiment_id], IS_SWEEP)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["backbone"] == str(tiny_backbone_dir) and "git_commit" in parent.data.params
    assert (parent.data.params["tune_norms"], parent.data.params["retune_norms"]) == ("True", "False")
    assert parent.data.params["device"] == "cpu"
    assert {"full_accuracy", "linear_probe_accuracy", "full_parameters"} <= set(parent.data.metrics)
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"results.parquet", "accuracy_vs_sparsity.png", "attribution", "benchmark",
            "speedup_vs_rate.png"} <= parent_files
    report = {f.path for f in client.list_artifacts(parent.info.run_id, "benchmark")}
    assert report == {"benchmark/benchmark.md", "benchmark/benchmark.csv", "benchmark/benchmark.json"}
    measured = json.loads(Path(client.download_artifacts(parent.info.run_id, "benchmark/benchmark.json")).read_text())
    assert {r["repeats"] for r in measured["rows"]} == {TINY_SWEEP["benchmark_repeats"]}  # the sweep's parameter
    assert parent.data.params["benchmark_threads"].isdigit() and "full_latency_ms_b32_t24" in parent.data.metrics
    children = child_runs(client, parent, IS_POINT)
    assert sorted(c.data.params["method"] for c in children) == ["grad_x_act", "random"]
    # The reference models have child runs of their own, so the parent run's figures are the sweep's only: an
    # unprefixed `accuracy` there would be one reference model's, whichever was logged last.
    references = child_runs(client, parent, IS_REFERENCE)
    assert [r.info.run_name for r in references] == ["full-seed0"]  # the probe has no model
    assert not {"accuracy", "val_accuracy", "speedup_vs_input", "parameters", "rate"} & set(parent.data.metrics)
    for reference in references:
        row = next(r for r in records if r["path"] and Row.of(r).key() == reference.data.tags["skeleton.point"])
        assert reference.data.metrics["accuracy"] == pytest.approx(row["accuracy"])
        assert reference.data.metrics["speedup_b32_t24"] > 0  # its benchmark, as the points have theirs

    # skeleton benchmark --from-sweep finds this sweep's models through its results table.
    from flows.commands import benchmark as script
    found = script.from_mlflow("tracked", "random", [0.5])
    assert list(found) == ["full", "random p=0.5"] and all((p / "neurons.json").is_file() for p in found.values())
    # the full model's normalisation layers were tuned, so the skeleton's are its own too (not the backbone's)
    assert all(json.loads((p / "neurons.json").read_text())["tune_norms"] for p in found.values())
    assert script.from_mlflow("tracked", "random", [0.9]) is None
    for child in children:
        assert {"accuracy", "macro_f1", "speedup", "parameters", "kept_width", "rate"} <= set(child.data.metrics)
        assert {"speedup_bound", "bound_ratio", "speedup_b32_t24", "speedup_b1_t24", "bound_ratio_b32_t24",
                "peak_mem_mb_b32_t24"} <= set(child.data.metrics)
        model = client.get_logged_model(child.data.tags["skeleton.model_id"])  # the skeleton, as an MLflow model
        assert model.source_run_id == child.info.run_id and model.tags["skeleton.method"] == child.data.params["method"]
    full = client.get_logged_model(next(r.data.tags["skeleton.model_id"] for r in references
                                        if r.info.run_name == "full-seed0"))
    assert full.name == "full" and {m.key for m in full.metrics} >= {"accuracy", "macro_f1", "parameters"}


@pytest.mark.parametrize("overrides, error, message", [
    ({"rates": [0.5, 1.0]}, ValueError, r"pruning rate must be in \[0, 1\)"),
    ({"methods": ["grad_x_actt"]}, KeyError, "unknown selection method 'grad_x_actt'"),
    ({"backbone": "bert-huge"}, ValueError, "unknown backbone 'bert-huge'"),
    ({"precision": "fp16"}, ValueError, "precision must be one of fp32, bf16, auto, got 'fp16'"),
    ({"target_speedups": [2.0, 1.0]}, ValueError, "target speed-up must be above 1, got 1.0"),
    ({"reconstruct_damping": -0.1}, ValueError, "damping must be >= 0"),
    ({"train_evals": 0}, ValueError, "train_evals must be at least 1, got 0"),
    ({"retune_steps": 0}, ValueError, "steps, batch_size and eval_every must be positive"),
    ({"seeds": []}, ValueError, "seeds must name at least one seed"),
    ({"head_rates": [0.5], "methods": ["wanda"]}, ValueError, "head rates > 0 need methods that score attention heads"),
    ({"label_column": "stars"}, DataError, "column 'stars' not found"),
    ({"data_file": "missing.csv"}, DataError, "data file not found"),
    ({"data_file": None, "text_column": "text", "label_column": "label", "task": "sst3"}, DataError,
     "unknown task 'sst3'.*rotten_tomatoes"),
    ({"data_file": None, "task": "rotten_tomatoes"}, ValueError, "text_column names a column of data_file"),
    ({"max_length": 200}, ValueError, "max_length 200 \\+ prompt_length 4 exceed the 128 positions"),
])
def test_bad_input_fails_before_training(prefect_server, tiny_backbone_dir, reviews_csv, overrides, error, message):
    import os
    from pathlib import Path

    from flows.sweep import full_sweep

    models = Path(os.environ["SKELETON_ARTIFACTS"]) / "models"
    before = set(models.iterdir()) if models.exists() else set()
    with pytest.raises(error, match=message):
        full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, **overrides))
    after = set(models.iterdir()) if models.exists() else set()
    assert after == before  # nothing was trained


def test_sweep_on_local_dask_cluster_matches_default_runner(prefect_server, tiny_backbone_dir, reviews_csv, tmp_path):
    from flows.sweep import dask_runner, full_sweep

    # The default runner's sweep of the end-to-end test (cached when it ran first); the Dask one on a copy of the
    # data file under another path: same data, fresh cache keys, so it really computes.
    copy = tmp_path / reviews_csv.name
    copy.write_bytes(reviews_csv.read_bytes())
    args = dict(rates=[0.5, 0.75], retune_norms=True, experiment="dask")
    default = pd.DataFrame(full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, **args)))
    on_dask = pd.DataFrame(full_sweep.with_options(task_runner=dask_runner("local:2"))(
        **sweep_args(tiny_backbone_dir, copy, **args)))
    same = ["method", "rate", "kept_width", "accuracy", "macro_f1", "parameters", "val_accuracy"]
    pd.testing.assert_frame_equal(default[same], on_dask[same])
    assert set(default["path"].dropna()).isdisjoint(on_dask["path"].dropna())  # the Dask sweep computed its own

    # Child runs logged from the Dask workers nest under their sweep's parent run.
    import mlflow

    from tasks.tracking import child_runs

    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name("dask").experiment_id
    parents = client.search_runs([experiment_id], IS_SWEEP)
    assert len(parents) == 2
    for parent in parents:
        children = child_runs(client, parent, IS_POINT)
        assert sorted((c.data.params["method"], c.data.metrics["rate"]) for c in children) == [
            ("grad_x_act", 0.5), ("grad_x_act", 0.75), ("random", 0.5), ("random", 0.75)]


def test_crashed_sweep_marks_its_mlflow_run_failed(prefect_server, tiny_backbone_dir, reviews_csv, monkeypatch):
    import mlflow
    from prefect import task

    import flows.sweep as sweep

    @task
    def broken(*args, **kwargs):
        raise RuntimeError("attribution exploded")

    monkeypatch.setattr(sweep.pipeline.attribute, "submit", broken.submit)
    with pytest.raises(RuntimeError, match="attribution exploded"):
        sweep.full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, experiment="crash"))
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    assert run.info.status == "FAILED"


def test_sweep_over_seeds_head_rates_and_a_joint_budget(prefect_server, tiny_backbone_dir, reviews_csv):
    """Two seeds, a head rate beside FFN-only, a joint-budget point and reconstruction: per-seed records, a summary with
    the spread over seeds, all in MLflow."""
    import mlflow

    from flows.sweep import full_sweep
    from tasks.results import summary_table
    from tasks.tracking import child_runs

    records = full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, methods=["grad_x_act"], head_rates=[0.0, 0.5],
                                      target_speedups=[1.5], reconstruct=True, seeds=[0, 1], experiment="seeds"))
    table = pd.DataFrame(records)
    assert sorted(table["seed"].unique()) == [0, 1]
    points = table[table["method"] == "grad_x_act"]
    assert sorted(points["point"].unique()) == ["p=0.5 h=0", "p=0.5 h=0.5", "x1.5"]
    assert (points.groupby("point").size() == 2).all()
    assert (points[points["point"] == "x1.5"]["speedup_bound"] >= 1.5 - 1e-9).all()
    summary = summary_table(records)
    assert (summary["seeds"] == 2).all() and summary["accuracy_std"].notna().all()
    full = table[table["method"] == "full (prompt tuning)"]
    assert summary.iloc[0]["accuracy"] == pytest.approx(full["accuracy"].mean())

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("seeds")
    parent = client.search_runs([experiment.experiment_id], IS_SWEEP)[0]
    assert {"summary.parquet", "results.parquet"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "full_accuracy_std" in parent.data.metrics
    children = child_runs(client, parent)
    points = [c for c in children if c.data.tags["skeleton.kind"] == "point"]
    assert len(points) == 6 and {c.data.params["seed"] for c in points} == {"0", "1"}
    # every seed's full model has its run: a choice on any seed can be the full model
    assert sorted(c.info.run_name for c in children if c.data.tags["skeleton.kind"] == "reference") == [
        "full-seed0", "full-seed1"]


def test_unset_parameters_take_the_backbone_familys_defaults(tiny_backbone_dir, tmp_path):
    """A parameter left None takes the backbone family's default, a given one always wins; a local LLaMA folder
    gets the LLaMA family's budgets, as the registered smollm2 does."""
    from flows.config import FAMILY_DEFAULTS, SweepConfig
    from helpers import tiny_llama_config
    from skeleton.backbones import FAMILIES

    tiny_llama_config().save_pretrained(tmp_path)  # config.json alone: the family is read from it, no weights
    assert set(FAMILY_DEFAULTS) == set(FAMILIES)  # every registered family has its defaults
    bert, llama = FAMILY_DEFAULTS["bert"], FAMILY_DEFAULTS["llama"]
    assert bert["train_steps"] != llama["train_steps"] and bert["reconstruct"] != llama["reconstruct"]
    assert (bert["prompt_methods"], llama["prompt_methods"]) == (["prefix"], ["input"])  # chosen per family
    family_fields = {f.name for f in dataclasses.fields(SweepConfig) if f.metadata["family"]}
    assert set(bert) == set(llama) == family_fields  # every family field has a value in every family
    for backbone, family in (("minilm", bert), (str(tiny_backbone_dir), bert), ("smollm2", llama),
                             (str(tmp_path), llama)):
        config = SweepConfig(backbone=backbone).resolved()
        assert {name: getattr(config, name) for name in family_fields} == family, backbone
    given = SweepConfig(backbone=str(tmp_path), train_steps=7, reconstruct=False, methods=["wanda"]).resolved()
    assert (given.train_steps, given.reconstruct, given.methods) == (7, False, ["wanda"])
    assert given.retune_steps == llama["retune_steps"]


def test_flow_parameters_cli_options_and_mlflow_params_are_the_config_fields():
    """Adding a SweepConfig field adds a flow parameter (with its help in Prefect's schema), an option and a param."""
    import argparse

    from flows.config import SweepConfig, add_options, from_options
    from flows.sweep import full_sweep

    names = [f.name for f in dataclasses.fields(SweepConfig)]
    schema = full_sweep.parameters.model_dump()["properties"]
    assert list(schema) == names
    assert schema["rates"]["description"] == SweepConfig.__dataclass_fields__["rates"].metadata["help"]
    parser = argparse.ArgumentParser()
    add_options(parser, SweepConfig)
    args = parser.parse_args(["--rates", "0.3", "0.6", "--no-reconstruct", "--train-steps", "9", "--seeds", "1", "2"])
    config = from_options(SweepConfig, args)
    assert (config.rates, config.reconstruct, config.train_steps, config.seeds) == ([0.3, 0.6], False, 9, [1, 2])
    assert config.methods is None and config.task == "rotten_tomatoes"  # not given: the field's default
    assert list(config.params()) == names
    assert SweepConfig(data_file="/x/my.csv").params()["task"] == "file:my.csv"


def test_sweep_compares_prompt_methods_beside_a_finetuned_reference(prefect_server, tiny_backbone_dir, reviews_csv):
    """Skeletons of the prefix prompt only: the input-prompt full model is trained all the same (every sweep's
    reference); a fine-tuned reference row; speed-ups against the full model of the same prompt method and against
    the input-prompt one, side by side; the frontier plot."""
    import mlflow

    from flows.sweep import full_sweep
    from tasks.results import FINETUNED, FULL, FULL_PREFIX, PROBE, summary_table
    from tasks.tracking import child_runs

    records = full_sweep(**sweep_args(tiny_backbone_dir, reviews_csv, methods=["grad_x_act"], distill=0.0,
                                      prompt_methods=["prefix"], finetune=True, experiment="prompts"))
    rows = {(r["prompt"], r["method"]): r for r in records}
    assert set(rows) == {("input", FULL), ("prefix", FULL_PREFIX), ("-", FINETUNED), ("-", PROBE),
                         ("prefix", "grad_x_act")}
    full, prefix, cut = rows["input", FULL], rows["prefix", FULL_PREFIX], rows["prefix", "grad_x_act"]
    assert full["speedup"] == prefix["speedup"] == 1.0 and full["speedup_vs_input"] == 1.0
    assert prefix["bound_vs_input"] > 1.0  # its prompt runs no positions
    assert cut["bound_vs_input"] > cut["speedup_bound"] > 1.0
    assert cut["bound_vs_input"] == pytest.approx(cut["speedup_bound"] * prefix["bound_vs_input"], rel=0.01)
    assert json.loads((Path(cut["path"]) / "neurons.json").read_text())["prompt_method"] == "prefix"
    tuned = rows["-", FINETUNED]
    assert json.loads((Path(tuned["path"]) / "neurons.json").read_text())["finetune"] is True
    assert tuned["parameters"] < full["parameters"]  # no prompt: the backbone and the head
    assert len(summary_table(records)) == 5

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("prompts")
    parent = client.search_runs([experiment.experiment_id], IS_SWEEP)[0]
    assert "accuracy_vs_speedup.png" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"full_prefix_accuracy", "finetuned_accuracy", "full_prefix_speedup_vs_input"} <= set(parent.data.metrics)
    children = child_runs(client, parent)
    assert sorted((c.data.tags["skeleton.kind"], c.info.run_name) for c in children) == [
        ("point", "grad_x_act-p0.5-prefix-seed0"), ("reference", "finetuned-seed0"), ("reference", "full-seed0"),
        ("reference", "prefix-full-seed0")]
    assert all("speedup_vs_input" in c.data.metrics for c in children)
    # Every exported model is an MLflow model: the three reference models beside the skeleton.
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert set(models) == {"full", "prefix-full", "finetuned", "prefix-grad_x_act-p50"}
    assert models["prefix-full"].metrics and models["prefix-full"].tags["skeleton.prompt"] == "prefix"
    # Each reference model carries its own row's figures, not another model's logged from the same run.
    for name, row in (("full", full), ("prefix-full", prefix), ("finetuned", tuned)):
        for key in ("speedup_vs_input", "parameters"):
            linked = [m.value for m in models[name].metrics if m.key == key]
            assert linked == pytest.approx([row[key]]), (name, key)


def test_max_drop_chooses_the_fastest_skeleton_within_the_budget(prefect_server, wide_backbone_dir, reviews_csv,
                                                                 caplog):
    """--max-drop: the search cuts skeletons at the rates bisection picks (the grid's reused), never chooses one over
    the budget, says what it chose against validation and test; the choice is tagged in MLflow and is what
    `skeleton promote` takes without a rate; where users look (the sweep's output, its Prefect artifact, its MLflow
    run's description) the choice comes first, with links to the chosen run and to the models compared, fastest
    first; a cached rerun recomputes nothing."""
    import mlflow

    from flows.search import LADDER, floor, passes
    from flows.sweep import full_sweep
    from tasks import nightly
    from tasks.results import FULL, Row
    from tasks.tracking import child_runs

    args = sweep_args(wide_backbone_dir, reviews_csv, methods=["grad_x_act"], max_drop=5.0, experiment="budget")
    state = full_sweep(**args, return_state=True)
    rows = [Row.of(r) for r in state.result()]
    skeletons = [r for r in rows if not r.is_reference]
    assert {r.rate for r in skeletons} <= {*LADDER, 0.5} and 1 < len(skeletons) < len(LADDER)
    [chosen] = [r for r in rows if r.chosen]
    lowest = floor([r for r in rows if r.method == FULL], 5.0)
    assert passes(chosen, lowest)
    assert all(r.speedup_vs_input <= chosen.speedup_vs_input for r in rows if r.path and passes(r, lowest))
    out = caplog.text  # the flow's prints are its log records
    assert "accuracy budget (--max-drop 5): the fastest model whose validation accuracy is at most 5 points" in out
    assert f"{len(skeletons)} grad_x_act skeletons built against a grid's {len(LADDER)}" in out
    # ... and how far test can be read: the drop's interval, from the test logits the models were judged on.
    assert not chosen.is_reference and re.search(r"; 90% interval -?[\d.]+ to -?[\d.]+: (within the budget|over "
                                                 r"the budget|the test split cannot tell)\), validation", out)

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("budget").experiment_id
    [parent] = client.search_runs([experiment], IS_SWEEP)
    assert parent.data.tags["skeleton.chosen"] == chosen.key()
    assert parent.data.metrics["chosen_val_accuracy"] == pytest.approx(chosen.val_accuracy)
    tagged = child_runs(client, parent, IS_CHOSEN)
    assert [float(r.data.params["rate"]) for r in tagged] == [chosen.rate]  # a full model chosen has its run too
    promoted, _ = nightly.promote_for_serving(state.result(), None)
    assert promoted.path == chosen.path

    # The run's description (the first thing its page shows): links to the chosen run and the compare view, then
    # what was chosen against the budget. Every link asks for the UI's Model training view.
    note = parent.data.tags["mlflow.note.content"]
    pid, ml = parent.info.run_id, "workflowType=machine_learning"
    compared = f"#/experiments/{experiment}/runs?viewStateShareKey={pid}&{ml}"
    assert note.index(f"({compared})") < note.index("- seed 0 chose ") < note.index("accuracy budget (--max-drop 5)")
    for run in tagged:
        assert f"[chosen: {run.info.run_name}](#/experiments/{experiment}/runs/{run.info.run_id}?{ml})" in note
    # The compare view: the sweep's models (its points and the full model), fastest first, the choice and what it
    # weighed in the first columns.
    view = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{pid}"])
    assert view["columnOrder"][:4] == ["tags.`skeleton.chosen`", "metrics.`accuracy`", "metrics.`val_accuracy`",
                                       "metrics.`speedup_vs_input`"]
    shown = client.search_runs([experiment], view["searchFilter"], order_by=["metrics.speedup_vs_input DESC"])
    assert sorted(r.info.run_id for r in shown) == sorted(r.info.run_id for r in child_runs(client, parent)) and len(
        shown) == len(skeletons) + 1
    [reference] = [r for r in shown if r.data.tags["skeleton.kind"] == "reference"]
    assert reference.info.run_name == "full-seed0" and reference.data.metrics["speedup_vs_input"] == 1.0
    # The full model carries its own figures only, not the sweep's (chosen_*, full_*, linear_probe_*).
    full = client.get_logged_model(reference.data.tags["skeleton.model_id"])
    assert [m.key for m in full.metrics][:3] == ["accuracy", "val_accuracy", "speedup_vs_input"]
    assert not [m.key for m in full.metrics if m.key.startswith(("chosen_", "full_", "linear_probe_"))]
    # The sweep's printed output and its Prefect artifact lead with the same report and links.
    assert f"every model, fastest first: http://127.0.0.1:5000/{compared}" in out
    headline = artifacts_of(state)["markdown"].data
    assert headline.index("- seed 0 chose ") < headline.index(f"(http://127.0.0.1:5000/{compared})")

    again = full_sweep(**args, return_state=True)
    runs = task_states(again.state_details.flow_run_id, expected=13 + 3 * len(skeletons))
    heavy = {"prepare-data", "tune-prompt", "linear-probe", "attribute", "teacher-logits", "build-skeleton",
             "evaluate", "benchmark-latency"}
    assert [st for name, st in runs if name in heavy] == ["Cached"] * (9 + 2 * len(skeletons))
    assert [r for r in map(Row.of, again.result()) if r.chosen][0].path == chosen.path
