"""The Skeleton sweep, end to end, as the Prefect flow `skeleton`.

    data -> prompt tuning -> attribution (per method) -> skeleton per (method, rate): slice, re-tune, export
         -> evaluation of every model -> interleaved latency -> MLflow (parent run + child run per point)

Run it locally (ephemeral Prefect, SQLite MLflow in the project folder):
    python -m flows.sweep                      # rotten_tomatoes on minilm, rates 0.5 0.65 0.8
    python -m flows.sweep --task reuters_r8
    python -m flows.sweep --data-file my.csv --text-column review --label-column sentiment
or deployed: `prefect deployment run skeleton/full-sweep -p task=reuters_r8`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "skeleton")  # library progress shows in flow logs

from prefect import flow  # noqa: E402

from tasks import pipeline, tracking  # noqa: E402
from tasks.report import COLUMNS, results_table  # noqa: E402

DEFAULT_RATES = [0.5, 0.65, 0.8]
DEFAULT_METHODS = ["grad_x_act", "random"]


def _file_hash(path: str | None) -> str | None:
    """The user file's content hash, so editing the file invalidates the cached data step."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@flow(name="skeleton", log_prints=True)
def full_sweep(
    task: str = "rotten_tomatoes",
    backbone: str = "minilm",
    rates: list[float] = DEFAULT_RATES,
    methods: list[str] = DEFAULT_METHODS,
    prompt_length: int = 20,
    max_length: int = 64,
    train_steps: int = 800,
    retune_steps: int = 200,
    attribution_examples: int = 1024,
    seed: int = 0,
    data_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    experiment: str = "skeleton",
) -> list[dict]:
    """Run the sweep and return the results table as records."""
    from skeleton.attribution import METHODS
    from skeleton.backbones import resolve_backbone
    from skeleton.prune import check_rate

    # Bad input fails here, before any training starts.
    rates = [check_rate(r) for r in rates]
    for method in methods:
        METHODS[method]
    resolve_backbone(backbone)
    task_name = "file:" + Path(data_file).name if data_file else task

    data = pipeline.prepare_data(task_name, backbone, max_length, seed, data_file and str(Path(data_file).resolve()),
                                 text_column, label_column, _file_hash(data_file))
    print(f"data: {data['split_sizes']} labels {data['label_names']}")
    train_config = {"steps": train_steps, "seed": seed}
    retune_config = {"steps": retune_steps, "seed": seed, "warmup_steps": 10, "eval_every": max(1, retune_steps // 4)}
    run_id = tracking.start_sweep_run(experiment, {
        "task": task_name, "backbone": backbone, "prompt_length": prompt_length, "max_length": max_length,
        "train_steps": train_steps, "retune_steps": retune_steps, "attribution_examples": attribution_examples,
        "seed": seed, "rates": rates, "methods": methods, "artifacts": str(pipeline.artifacts_dir())})

    full_model = pipeline.tune_prompt(data["path"], backbone, prompt_length, train_config)
    full = {**pipeline.evaluate(data["path"], full_model["path"]), "path": full_model["path"]}
    probe = pipeline.linear_probe(data["path"], backbone, seed)
    print(f"full prompt-tuned accuracy {full['accuracy']:.4f}; linear probe {probe['accuracy']:.4f}")

    rows, scores = [], {}
    for method in methods:
        scores[method] = pipeline.attribute(data["path"], full_model["path"], method, attribution_examples, seed)["path"]
        for rate in rates:
            built = pipeline.build_skeleton(data["path"], full_model["path"], scores[method], rate, retune_config)
            result = pipeline.evaluate(data["path"], built["path"])
            rows.append({"method": method, "rate": rate, "kept_width": built["kept_width"],
                         "val_accuracy": built["val_accuracy"], **result, "path": built["path"]})
            print(f"sweep point {len(rows)}/{len(methods) * len(rates)}: {method} p={rate} "
                  f"accuracy {result['accuracy']:.4f}")

    speed = pipeline.benchmark(full["path"], [r["path"] for r in rows], batch_size=32, seq_len=max_length, repeats=20)
    for row in rows:
        row["speedup"] = speed[row["path"]]["speedup"]
        tracking.log_point(run_id, row)
    tracking.finish_sweep_run(run_id, rows, full, probe, scores)
    table = results_table(rows, full, probe)
    printed = table[COLUMNS].to_string(index=False, float_format="%.4f")
    print(f"data {data['path']}\nMLflow run {run_id} ({tracking.tracking_uri()})\n{printed}")
    return [{**record, "data": data["path"]} for record in table.to_dict("records")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Skeleton sweep as a Prefect flow (ephemeral server).")
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--backbone", default="minilm", help="registered name or a local checkpoint folder")
    parser.add_argument("--rates", type=float, nargs="+", default=DEFAULT_RATES)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--retune-steps", type=int, default=200)
    parser.add_argument("--attribution-examples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-file", help="your own CSV / JSONL / Parquet file instead of --task")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--experiment", default="skeleton", help="MLflow experiment name")
    args = parser.parse_args(argv)
    full_sweep(**{k: v for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
