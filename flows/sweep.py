"""The Skeleton sweep, end to end, as the Prefect flow `skeleton`.

    data -> prompt tuning -> attribution (per method) -> skeleton per (method, rate): slice, re-tune, export
         -> evaluation of every model -> interleaved latency vs arithmetic bound
         -> MLflow (parent run + child run per point)

Run it locally (ephemeral Prefect, SQLite MLflow in the project folder):
    python -m flows.sweep                      # rotten_tomatoes on minilm, rates 0.5 0.65 0.8
    python -m flows.sweep --task reuters_r8
    python -m flows.sweep --data-file my.csv --text-column review --label-column sentiment
or deployed: `prefect deployment run skeleton/full-sweep -p task=reuters_r8`.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path

# Library progress (training steps, attribution batches) shows in the flow's logs and the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "skeleton")
logging.getLogger("skeleton").setLevel(logging.INFO)

from prefect import flow  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from tasks import pipeline, tracking  # noqa: E402
from tasks.report import COLUMNS, results_table  # noqa: E402

DEFAULT_RATES = [0.5, 0.65, 0.8]
DEFAULT_METHODS = ["grad_x_act", "random"]


def _file_hash(path: str | None) -> str | None:
    """The user file's content hash, so editing the file invalidates the cached data step."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@flow(name="skeleton", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def full_sweep(
    task: str = "rotten_tomatoes",
    backbone: str = "minilm",
    rates: list[float] = DEFAULT_RATES,
    methods: list[str] = DEFAULT_METHODS,
    prompt_length: int = 20,
    max_length: int = 64,
    train_steps: int = 800,
    retune_steps: int = 200,
    distill: float = 0.5,
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
    from skeleton.benchmark import at
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
    retune_config = {"steps": retune_steps, "seed": seed, "warmup_steps": 10, "eval_every": max(1, retune_steps // 4),
                     "distill": distill}
    run_id = tracking.start_sweep_run(experiment, {
        "task": task_name, "backbone": backbone, "prompt_length": prompt_length, "max_length": max_length,
        "train_steps": train_steps, "retune_steps": retune_steps, "distill": distill,
        "attribution_examples": attribution_examples,
        "seed": seed, "rates": rates, "methods": methods, "artifacts": str(pipeline.artifacts_dir())})

    try:
        full_model = pipeline.tune_prompt(data["path"], backbone, prompt_length, train_config)
        full = {**pipeline.evaluate(data["path"], full_model["path"]), "path": full_model["path"],
                "val_accuracy": full_model["val_accuracy"]}
        probe = pipeline.linear_probe(data["path"], backbone, seed)
        print(f"full prompt-tuned accuracy {full['accuracy']:.4f}; linear probe {probe['accuracy']:.4f}")

        # Independent sweep points are submitted together: a Dask task runner spreads them over its workers,
        # the default runner takes them one at a time (parallel threads would only fight over the cores).
        scores = {m: pipeline.attribute.submit(data["path"], full_model["path"], m, attribution_examples, seed)
                  for m in methods}
        scores = {m: future.result()["path"] for m, future in scores.items()}
        teacher = pipeline.teacher_logits(data["path"], full_model["path"])["path"] if distill else None
        points = [(m, r) for m in methods for r in rates]
        built = [pipeline.build_skeleton.submit(data["path"], full_model["path"], scores[m], r, retune_config, teacher)
                 for m, r in points]
        built = [future.result() for future in built]
        results = [pipeline.evaluate.submit(data["path"], b["path"]) for b in built]
        rows = []
        for (method, rate), b, future in zip(points, built, results):
            result = future.result()
            rows.append({"method": method, "rate": rate, "kept_width": b["kept_width"],
                         "val_accuracy": b["val_accuracy"], **result, "path": b["path"]})
            print(f"sweep point {len(rows)}/{len(points)}: {method} p={rate} accuracy {result['accuracy']:.4f}")

        bench = pipeline.benchmark(full["path"], [r["path"] for r in rows], pipeline.BENCHMARK_BATCH_SIZES,
                                   [max_length], repeats=20)
        headline = at(bench, pipeline.BENCHMARK_BATCH_SIZE, max_length)
        for row in rows:
            row.update({key: headline[row["path"]][key] for key in ("speedup", "speedup_bound", "bound_ratio")})
        logged = [tracking.log_point.submit(run_id, row, [b for b in bench["rows"] if b["model"] == row["path"]])
                  for row in rows]
        for future in logged:
            future.result()
        table = results_table(rows, full, probe)
        records = [{**record, "data": data["path"]} for record in table.to_dict("records")]
        tracking.log_benchmark(run_id, bench, records)
        tracking.finish_sweep_run(run_id, records, full, probe, scores)
        printed = table[COLUMNS].to_string(index=False, float_format="%.4f")
        print(f"data {data['path']}\nMLflow run {run_id} ({tracking.tracking_uri()})\n{printed}")
    except BaseException:
        tracking.fail_run(run_id)  # a crashed sweep must not look "running" in MLflow forever
        raise
    return records


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
    parser.add_argument("--distill", type=float, default=0.5,
                        help="weight of the full model's soft labels when re-tuning a skeleton (0 = off)")
    parser.add_argument("--attribution-examples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-file", help="your own CSV / JSONL / Parquet file instead of --task")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--experiment", default="skeleton", help="MLflow experiment name")
    parser.add_argument("--dask", metavar="ADDRESS", help="run sweep points on a Dask cluster: a scheduler "
                        "address (tcp://host:8786), or 'local:N' for a local cluster of N workers")
    args = vars(parser.parse_args(argv))
    dask = args.pop("dask")
    sweep = full_sweep.with_options(task_runner=dask_runner(dask)) if dask else full_sweep
    sweep(**args)


def dask_runner(address: str):
    """A prefect-dask task runner: an existing cluster's scheduler address, or 'local:N' (N workers)."""
    from prefect_dask import DaskTaskRunner

    if address.startswith("local:"):
        workers = int(address.split(":", 1)[1])
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(address=address)


if __name__ == "__main__":
    main()
