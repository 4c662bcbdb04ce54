"""A sweep's results: a Row per model (the reference models and every sweep point, per seed), the tables made of
them, the speed-ups the sweep's benchmark gives them, and the latest sweep's rows read back from MLflow.

    rows = [Row.of_reference(...), Row.of_point(...), ...]       # what the flow makes (flows/sweep.py)
    results_table(rows)        the per-seed table (results.parquet, the flow's return value)
    summary_table(records)     a row per sweep point: means over seeds (summary.parquet, the printed table)
    latest_sweep("skeleton")   (rows, MLflow run id) of the latest finished sweep, or None

A row's model is named by skeleton.folder.model_name (Row.name). Plain Python at import time (pandas and MLflow
load when used): `skeleton benchmark` imports it on machines without Prefect or MLflow.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from skeleton.folder import model_name
from tasks.queries import IS_FINISHED, IS_SWEEP

FULL, FULL_PREFIX, FINETUNED, PROBE = "full (prompt tuning)", "full (prefix tuning)", "fine-tuned", "linear probe"
FULLS = {"input": FULL, "prefix": FULL_PREFIX}  # prompt method -> its full model's row
REFERENCES = (FULL, FULL_PREFIX, FINETUNED, PROBE)  # in the order tables list them
BENCHMARK_BATCH_SIZE = 32  # the sweep's headline speed-up (at max_length text tokens), and the nightly baseline's
# The sweep's in-flow latency grid, at max_length text tokens: cheap. The full grid: `skeleton benchmark`.
BENCHMARK_BATCH_SIZES = (1, BENCHMARK_BATCH_SIZE)


@dataclass
class Row:
    """One model of a sweep: a reference (method: its name in REFERENCES, point "", rate 0) or a sweep point's
    skeleton. Fields in the results table's column order; a summary row (means over seeds) has `accuracy_std` and
    `seeds` too."""

    seed: int = 0
    prompt: str = "input"  # prompt method (skeleton.model.PROMPT_METHODS); "-" for the fine-tuned model and the probe
    method: str = ""  # selection method, or a reference row's name
    point: str = ""  # "p=<rate> h=<head rate>", or "x<target>" for a joint budget
    rate: float = 0.0  # share of FFN neurons cut (a joint budget's: what it chose)
    head_rate: float = 0.0
    kept_width: int | None = None  # FFN neurons kept per layer (the mean if they differ)
    accuracy: float | None = None  # on the test split, of the model reloaded from its folder
    macro_f1: float | None = None
    speedup: float | None = None  # over the full model of the row's own prompt method (like for like)
    speedup_bound: float | None = None  # multiply-adds of that full model over the row's
    bound_ratio: float | None = None  # speedup / speedup_bound
    speedup_vs_input: float | None = None  # over the input-prompt full model (the paper's prompt-tuning baseline)
    bound_vs_input: float | None = None
    parameters: int | None = None
    path: str | None = None  # the exported model folder (none for the linear probe)
    val_accuracy: float | None = None
    kept_widths: list[int] | None = None
    kept_heads: list[int] | None = None  # only when heads were cut
    logits: str | None = None  # the test logits it was judged on
    data: str | None = None  # the data folder
    chosen: bool = False  # the model --max-drop chose for its seed (flows/search.py)
    accuracy_std: float | None = None  # summary rows: the spread over seeds (empty with one seed)
    seeds: int | None = None  # summary rows: how many seeds the means are over

    @classmethod
    def of(cls, record: Row | Mapping) -> Row:
        """A row from a record (a table's row, a results.parquet row, a hand-made dict): other keys are ignored,
        missing and NaN / NA values are None (results from before a column existed read as its default)."""
        if isinstance(record, Row):
            return record
        values = {f.name: _plain(record[f.name]) for f in fields(cls) if f.name in record}
        return cls(**{k: v for k, v in values.items() if v is not None or cls.__dataclass_fields__[k].default is None})

    @classmethod
    def of_reference(cls, seed: int, prompt: str, method: str, trained: dict, evaluated: dict, data: str) -> Row:
        """A full (or fine-tuned) model's row: its prompt-tuning record and its evaluation's."""
        return cls(seed=seed, prompt=prompt, method=method, accuracy=evaluated["accuracy"],
                   macro_f1=evaluated["macro_f1"], parameters=evaluated["parameters"], path=trained["path"],
                   val_accuracy=trained["val_accuracy"], logits=evaluated["logits"], data=data)

    @classmethod
    def of_probe(cls, seed: int, probe: dict, data: str) -> Row:
        return cls(seed=seed, prompt="-", method=PROBE, accuracy=probe["accuracy"], macro_f1=probe["macro_f1"],
                   val_accuracy=probe["val_accuracy"], data=data)

    @classmethod
    def of_point(cls, seed: int, prompt: str, method: str, target: float | None, built: dict, evaluated: dict,
              data: str) -> Row:
        """A sweep point's row: its skeleton's build record and its evaluation's."""
        point = f"x{target:g}" if target else f"p={built['rate']:g} h={built['head_rate']:g}"
        return cls(seed=seed, prompt=prompt, method=method, point=point, rate=built["rate"],
                   head_rate=built["head_rate"], kept_width=built["kept_width"], accuracy=evaluated["accuracy"],
                   macro_f1=evaluated["macro_f1"], parameters=evaluated["parameters"], path=built["path"],
                   val_accuracy=built["val_accuracy"], kept_widths=built["kept_widths"],
                   kept_heads=built.get("kept_heads"), logits=evaluated["logits"], data=data)

    @property
    def is_reference(self) -> bool:
        return self.method in REFERENCES

    def meta(self) -> dict:
        """How its model was made, as model_name reads it."""
        prompt = self.prompt if self.prompt not in (None, "-") else "input"
        return {"method": None if self.is_reference else self.method, "rate": self.rate, "head_rate": self.head_rate,
                "prompt_method": prompt, "finetune": self.method == FINETUNED}

    def name(self, style: str = "label") -> str:
        """Its model's name (skeleton.folder.model_name): "label" for reports, "slug" for MLflow models, "expert"."""
        return model_name(self.meta(), style=style)

    def key(self) -> str:
        """What identifies a sweep point within its sweep (MLflow tag skeleton.point): seed, prompt method, selection
        method and point."""
        point = self.point or f"p={self.rate:g} h={self.head_rate or 0:g}"
        return f"seed{self.seed}/{self.prompt or 'input'}/{self.method}/{point}"


COLUMNS = [f.name for f in fields(Row) if f.name not in ("accuracy_std", "seeds")]  # the per-seed table
SUMMARY = ["prompt", "method", "point", "rate", "head_rate", "kept_width", "accuracy", "accuracy_std", "macro_f1",
           "val_accuracy", "speedup", "speedup_bound", "bound_ratio", "speedup_vs_input", "bound_vs_input",
           "parameters", "seeds", "chosen", "path"]
POINT = ["prompt", "method", "point"]  # a sweep point across seeds


def _plain(value):
    """A table cell as plain Python: NaN and pandas' NA are None, numpy scalars and arrays plain numbers and lists."""
    if hasattr(value, "tolist"):  # a numpy scalar or array (Parquet's list columns)
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, list, dict)):
        return value
    try:
        return None if value != value else value
    except (TypeError, ValueError):  # pd.NA cannot be compared
        return None


def _records(rows: Iterable[Row | Mapping]) -> list[Mapping]:
    return [dataclasses.asdict(r) if isinstance(r, Row) else r for r in rows]


def main_full(rows: Iterable[Row | Mapping]) -> Row:
    """The reference full model of a sweep: the input-prompt one (the paper's baseline), which every sweep has."""
    return next(row for row in map(Row.of, rows) if row.method == FULL)


def ordered(rows: Iterable[Row]) -> list[Row]:
    """As the tables list them: the full models, fine-tuned models and linear probes (each in the order they came),
    then the sweep points by seed, prompt method, selection method, rate and head rate."""
    kind = {FULL: 0, FULL_PREFIX: 0, FINETUNED: 1, PROBE: 2}
    rows = list(rows)
    references = sorted((r for r in rows if r.method in kind), key=lambda r: kind[r.method])
    points = sorted((r for r in rows if r.method not in kind), key=lambda r: (r.seed, r.prompt, r.method, r.rate,
                                                                               r.head_rate))
    return references + points


def results_table(rows: Iterable[Row]):
    """The per-seed table: a row per model, references first (`ordered`), in COLUMNS."""
    import pandas as pd

    table = pd.DataFrame([dataclasses.asdict(r) for r in ordered(rows)])
    return table.reindex(columns=COLUMNS).astype({"kept_width": "Int64", "parameters": "Int64"})


def summary_table(records: Iterable[Row | Mapping]):
    """One row per sweep point (and reference row): means over seeds, the accuracy's standard deviation across
    them (empty with one seed), the number of seeds, how many of them chose it (--max-drop) and the first seed's
    exported model."""
    import pandas as pd

    table = pd.DataFrame(_records(records)).reindex(columns=COLUMNS)
    grouped = table.groupby(POINT, sort=False, dropna=False)
    summary = grouped.agg(rate=("rate", "mean"), head_rate=("head_rate", "mean"), kept_width=("kept_width", "first"),
                          accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                          macro_f1=("macro_f1", "mean"), val_accuracy=("val_accuracy", "mean"),
                          speedup=("speedup", "mean"), speedup_bound=("speedup_bound", "mean"),
                          bound_ratio=("bound_ratio", "mean"), speedup_vs_input=("speedup_vs_input", "mean"),
                          bound_vs_input=("bound_vs_input", "mean"), parameters=("parameters", "first"),
                          seeds=("seed", "nunique"), chosen=("chosen", "sum"), path=("path", "first"))
    summary = summary.reset_index()
    order = {name: i for i, name in enumerate(REFERENCES)}
    summary = summary.sort_values(["method", "prompt", "rate", "head_rate"], kind="stable",
                                  key=lambda col: col.map(order).fillna(len(order)) if col.name == "method" else col)
    return summary[SUMMARY].astype({"kept_width": "Int64", "parameters": "Int64", "chosen": int}).reset_index(drop=True)


# ---- the sweep's benchmark ------------------------------------------------------------------------------------

@dataclass
class Measured:
    """Which model folders the sweep's benchmark measures: one per distinct model shape, against the input-prompt
    full model (`reference`, the paper's baseline) and the other prompt methods' full models (`baselines`)."""

    reference: str
    baselines: list[str]
    measured: list[str]  # besides the reference
    measured_as: dict[str, str]  # a row's model folder -> the folder measured for its shape
    own: dict[str, str]  # prompt method -> its full model's folder (the first seed's)


def to_measure(rows: list[Row]) -> Measured:
    """Seeds and methods that cut the same widths and heads share one measurement; so do a prompt method's full
    models and the fine-tuned ones."""
    fulls = [r for r in rows if r.method in (FULL, FULL_PREFIX)]
    own = {r.prompt: r.path for r in fulls if r.seed == fulls[0].seed}
    shaped = [(r, (r.prompt, tuple(r.kept_widths), tuple(r.kept_heads or ()))) for r in rows if not r.is_reference]
    shaped += [(r, (r.prompt, "full")) for r in fulls]
    shaped += [(r, ("fine-tuned",)) for r in rows if r.method == FINETUNED]
    first: dict[tuple, str] = {}
    measured_as = {row.path: first.setdefault(shape, row.path) for row, shape in shaped}
    reference = own["input"]
    return Measured(reference, [p for p in own.values() if p != reference],
                    [p for p in first.values() if p != reference], measured_as, own)


def set_speedups(rows: list[Row], plan: Measured, result: dict, batch_size: int, text_tokens: int) -> None:
    """Each row's speed-up and bound at (batch_size, text_tokens) from the benchmark `result`: `speedup`,
    `speedup_bound`, `bound_ratio` against the full model of its own prompt method (like for like; a fine-tuned
    model, which has none, against the input-prompt one) and `speedup_vs_input`, `bound_vs_input` against the
    input-prompt full model."""
    from skeleton.benchmark import at

    headline = at(result, batch_size, text_tokens)
    for row in rows:
        if row.path is None:
            continue  # the linear probe
        m = headline[plan.measured_as[row.path]]
        base = plan.own.get(row.prompt, plan.reference)
        speedup, bound = ((m["speedup"], m["speedup_bound"]) if base == plan.reference else
                          (m["speedups"][base], m["bounds"][base]))
        row.speedup, row.speedup_bound, row.bound_ratio = speedup, bound, speedup / bound
        row.speedup_vs_input, row.bound_vs_input = m["speedup"], m["speedup_bound"]


# ---- reading a sweep back ---------------------------------------------------------------------------------------

def latest_sweep(experiment: str = "skeleton", run_id: str | None = None) -> tuple[list[Row], str] | None:
    """The rows of a sweep's results table (its MLflow parent run's results.parquet) and the run's id: run `run_id`,
    else the latest finished sweep of `experiment`; None when there is none (no tracking store, no such
    experiment, no finished sweep). Needs MLflow (ImportError without it)."""
    import tempfile

    import mlflow
    import pandas as pd

    from tasks.paths import tracking_uri

    uri = tracking_uri()
    if run_id is None and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # no local tracking database: nothing to read (and none to create)
    client = mlflow.MlflowClient(uri)
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        runs = found and client.search_runs([found.experiment_id],
                                            f"{IS_SWEEP} and {IS_FINISHED}",
                                            order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.read_parquet(client.download_artifacts(run_id, "results.parquet", tmp))
    return [Row.of(record) for record in table.to_dict("records")], run_id
