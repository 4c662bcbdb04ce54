"""A sweep's rows without running a sweep: their table, the benchmark's shapes and speed-ups, the names of models."""
import math

import pandas as pd

from skeleton.folder import model_name
from tasks.results import FINETUNED, FULL, FULL_PREFIX, PROBE, Row, latest_sweep, results_table, set_speedups, to_measure


def sweep_rows() -> list[Row]:
    """Two seeds; an input and a prefix full model each; two methods cutting the same widths; a fine-tuned model."""
    rows = []
    for seed in (0, 1):
        rows.append(Row(seed=seed, prompt="-", method=PROBE, accuracy=0.7))
        rows.append(Row(seed=seed, prompt="-", method=FINETUNED, path=f"tuned{seed}", accuracy=0.8))
        for prompt, method in (("input", FULL), ("prefix", FULL_PREFIX)):
            rows.append(Row(seed=seed, prompt=prompt, method=method, path=f"{prompt}-full{seed}", accuracy=0.78))
        for method in ("random", "grad_x_act"):
            rows.append(Row(seed=seed, prompt="prefix", method=method, point="p=0.5 h=0", rate=0.5, kept_width=32,
                            kept_widths=[32, 32], path=f"{method}{seed}", accuracy=0.77))
    return rows


def test_one_measurement_per_shape_and_speedups_against_each_rows_own_full_model():
    rows = sweep_rows()
    measured = to_measure(rows)
    assert measured.reference == "input-full0" and measured.baselines == ["prefix-full0"]
    assert measured.measured == ["random0", "prefix-full0", "tuned0"]  # the points' shape, then the references'
    assert {measured.measured_as[p] for p in ("random0", "grad_x_act0", "random1", "grad_x_act1")} == {"random0"}
    assert measured.measured_as["input-full1"] == "input-full0"
    row = {"speedup": 2.0, "speedup_bound": 2.5, "speedups": {"prefix-full0": 1.6}, "bounds": {"prefix-full0": 2.0}}
    result = {"rows": [{"model": path, "batch_size": 32, "text_tokens": 64, **row}
                       for path in [measured.reference, *measured.measured]]}
    set_speedups(rows, measured, result, 32, 64)
    point = next(r for r in rows if r.method == "grad_x_act")
    assert (point.speedup, point.speedup_bound, point.bound_ratio) == (1.6, 2.0, 0.8)  # over the prefix full model
    assert (point.speedup_vs_input, point.bound_vs_input) == (2.0, 2.5)
    tuned = next(r for r in rows if r.method == FINETUNED)
    assert tuned.speedup == 2.0  # no prompt of its own: against the input-prompt full model
    assert next(r for r in rows if r.method == PROBE).speedup is None


def test_the_table_lists_references_first_and_reads_back_as_rows():
    table = results_table(sweep_rows())
    assert list(table["method"][:8]) == [FULL, FULL_PREFIX, FULL, FULL_PREFIX, FINETUNED, FINETUNED, PROBE, PROBE]
    assert list(table["seed"][8:]) == [0, 0, 1, 1] and list(table["method"][8:10]) == ["grad_x_act", "random"]
    back = [Row.of(record) for record in table.to_dict("records")]
    assert back[8].kept_widths == [32, 32] and back[0].kept_width is None and back[6].path is None
    parquet = Row.of(pd.DataFrame([{"method": "random", "rate": 0.5, "speedup": math.nan}]).iloc[0].to_dict())
    assert (parquet.seed, parquet.prompt, parquet.speedup) == (0, "input", None)  # a table from before both columns


def test_every_name_of_a_model_comes_from_one_function():
    point = {"task": "rt", "method": "grad_x_act", "rate": 0.875, "head_rate": 0.25, "prompt_method": "prefix"}
    assert model_name(point) == "rt-grad_x_act-p0.875-prefix-h0.25"  # served experts, MLflow run names
    assert model_name(point, style="label") == "prefix grad_x_act p=0.875 h=0.25"  # benchmark reports
    assert model_name(point, style="slug") == "prefix-grad_x_act-p87_5-h25"  # MLflow model names
    full = Row(prompt="prefix", method=FULL_PREFIX)
    assert (full.name("slug"), full.name("label"), full.name("expert")) == ("prefix-full", "full (prefix)",
                                                                            "full-p0.0-prefix")
    assert (Row(prompt="-", method=FINETUNED).name("slug"), Row(method=FULL).name()) == ("finetuned", "full")
    assert model_name({"rate": 0.8}, style="slug") == "p80"  # a nightly baseline's alias: baseline-p80


def test_no_tracking_store_is_no_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    assert latest_sweep("skeleton") is None and not (tmp_path / "none.db").exists()
