"""The Skeleton sweep, end to end, as the Prefect flow `skeleton`.

    per seed: data -> prompt tuning -> attribution (per method) -> skeleton per (method, FFN rate, head rate):
              slice, re-tune, export -> evaluation of every model
    then: interleaved latency vs arithmetic bound per skeleton shape -> MLflow (parent run + child run per point)

Run it locally (ephemeral Prefect, SQLite MLflow in the project folder):
    python -m flows.sweep                      # rotten_tomatoes on minilm, rates 0.5 0.65 0.8
    python -m flows.sweep --task reuters_r8
    python -m flows.sweep --methods all --seeds 0 1 2   # every selection method, mean and spread over 3 seeds
    python -m flows.sweep --head-rates 0 0.25 --allocation global --no-reconstruct
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
from tasks.report import results_table, summary_table  # noqa: E402

DEFAULT_RATES = [0.5, 0.65, 0.8]
DEFAULT_HEAD_RATES = [0.0]
DEFAULT_SEEDS = [0]
DEFAULT_TARGETS: list[float] = []  # joint-budget points are opt-in
# What a parameter left unset (None) means: budgets in optimizer steps and examples, sized so a default sweep takes
# about 15 minutes on 2 CPU cores. A registered backbone may change them: a smollm2 step costs ~8x MiniLM's.
DEFAULTS = {"methods": ["grad_x_act", "random"], "reconstruct": False, "tune_norms": False, "retune_norms": False,
            "train_steps": 800, "train_evals": 8, "retune_steps": 300, "retune_evals": 3, "attribution_examples": 1024}
BACKBONE_DEFAULTS = {"smollm2": {"methods": ["grad_x_act"], "reconstruct": True, "retune_norms": True,
                                 "train_steps": 120, "train_evals": 1, "retune_steps": 120, "retune_evals": 1,
                                 "attribution_examples": 256}}
SPLIT_SEED = 0  # the train/validation/test split stays the same whatever the training seeds


def resolve_defaults(backbone: str, **given) -> dict:
    """The given parameters in their order, each one left None replaced by the backbone's default."""
    defaults = {**DEFAULTS, **BACKBONE_DEFAULTS.get(backbone, {})}
    return {name: defaults[name] if value is None else value for name, value in given.items()}


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
    methods: list[str] | None = None,
    head_rates: list[float] = DEFAULT_HEAD_RATES,
    allocation: str = "uniform",
    reconstruct: bool | None = None,
    tune_norms: bool | None = None,
    retune_norms: bool | None = None,
    target_speedups: list[float] = DEFAULT_TARGETS,
    prompt_length: int = 20,
    max_length: int = 64,
    train_steps: int | None = None,
    train_evals: int | None = None,
    retune_steps: int | None = None,
    retune_evals: int | None = None,
    distill: float = 0.0,
    precision: str = "bf16",
    attribution_examples: int | None = None,
    seeds: list[int] = DEFAULT_SEEDS,
    data_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    experiment: str = "skeleton",
) -> list[dict]:
    """Run the sweep and return the results table as records: per seed, the full model, the linear probe and a
    skeleton per (method, FFN rate, head rate) and per (method, target speed-up): the joint budget decides how
    much of the FFN and of the attention heads to cut. methods=["all"] runs every registered selection method.
    Parameters left None take the backbone's defaults (DEFAULTS, updated by BACKBONE_DEFAULTS[backbone])."""
    from skeleton.attribution import METHODS, scores_heads
    from skeleton.backbones import resolve_backbone
    from skeleton.budget import check_target_speedup
    from skeleton.prune import check_allocation, check_head_rate, check_rate
    from skeleton.train import check_precision

    (methods, reconstruct, tune_norms, retune_norms, train_steps, train_evals, retune_steps, retune_evals,
     attribution_examples) = resolve_defaults(
        backbone, methods=methods, reconstruct=reconstruct, tune_norms=tune_norms, retune_norms=retune_norms,
        train_steps=train_steps, train_evals=train_evals, retune_steps=retune_steps, retune_evals=retune_evals,
        attribution_examples=attribution_examples).values()
    # Bad input fails here, before any training starts.
    rates = [check_rate(r) for r in rates]
    head_rates = [check_head_rate(r) for r in head_rates]
    check_allocation(allocation)
    target_speedups = [check_target_speedup(t) for t in target_speedups]
    check_precision(precision)
    if train_evals < 1 or retune_evals < 1:
        raise ValueError(f"train_evals and retune_evals must be at least 1, got {train_evals} and {retune_evals}")
    if not seeds:
        raise ValueError("seeds must name at least one seed, e.g. [0] or [0, 1, 2]")
    methods = METHODS.names() if methods == ["all"] else methods
    for method in methods:
        METHODS[method]
    if any(head_rates):
        unable = [m for m in methods if not scores_heads(m)]
        if unable:
            raise ValueError(f"head rates > 0 need methods that score attention heads; {', '.join(unable)} do not "
                             f"(those that do: {', '.join(m for m in METHODS if scores_heads(m))})")
    resolve_backbone(backbone)
    task_name = "file:" + Path(data_file).name if data_file else task

    data = pipeline.prepare_data(task_name, backbone, max_length, SPLIT_SEED,
                                 data_file and str(Path(data_file).resolve()), text_column, label_column,
                                 _file_hash(data_file))
    print(f"data: {data['split_sizes']} labels {data['label_names']}")
    run_id = tracking.start_sweep_run(experiment, {
        "task": task_name, "backbone": backbone, "prompt_length": prompt_length, "max_length": max_length,
        "train_steps": train_steps, "train_evals": train_evals, "retune_steps": retune_steps,
        "retune_evals": retune_evals, "distill": distill, "precision": precision,
        "attribution_examples": attribution_examples, "seeds": seeds, "rates": rates,
        "methods": methods, "head_rates": head_rates, "allocation": allocation, "reconstruct": reconstruct,
        "tune_norms": tune_norms, "retune_norms": retune_norms, "target_speedups": target_speedups,
        "artifacts": str(pipeline.artifacts_dir())})
    points = [(m, r, h, None) for m in methods for r in rates for h in head_rates]
    points += [(m, 0.0, 0.0, t) for m in methods for t in target_speedups]
    retune = {"steps": retune_steps, "warmup_steps": 10, "eval_every": max(1, retune_steps // retune_evals),
              "distill": distill, "precision": precision, "tune_norms": retune_norms}
    try:
        fulls, probes, rows, scores = {}, {}, [], {}
        for seed in seeds:
            full_model = pipeline.tune_prompt(data["path"], backbone, prompt_length, {
                "steps": train_steps, "eval_every": max(1, train_steps // train_evals), "seed": seed,
                "precision": precision, "tune_norms": tune_norms})
            fulls[seed] = {**pipeline.evaluate(data["path"], full_model["path"]), "path": full_model["path"],
                           "val_accuracy": full_model["val_accuracy"]}
            probes[seed] = pipeline.linear_probe(data["path"], backbone, seed, precision)
            print(f"seed {seed}: full prompt-tuned accuracy {fulls[seed]['accuracy']:.4f}; "
                  f"linear probe {probes[seed]['accuracy']:.4f}")

            # Independent sweep points are submitted together: a Dask task runner spreads them over its workers,
            # the default runner takes them one at a time (parallel threads would only fight over the cores).
            futures = {m: pipeline.attribute.submit(data["path"], full_model["path"], m, attribution_examples, seed)
                       for m in methods}
            scores[seed] = {m: future.result()["path"] for m, future in futures.items()}
            teacher = pipeline.teacher_logits(data["path"], full_model["path"])["path"] if distill else None
            built = [pipeline.build_skeleton.submit(data["path"], full_model["path"], scores[seed][m], r,
                                                    {**retune, "seed": seed}, teacher, h, allocation, reconstruct, t)
                     for m, r, h, t in points]
            built = [future.result() for future in built]
            results = [pipeline.evaluate.submit(data["path"], b["path"]) for b in built]
            for (method, _, _, target), b, future in zip(points, built, results):
                result = future.result()
                point = f"x{target:g}" if target else f"p={b['rate']:g} h={b['head_rate']:g}"
                rows.append({"seed": seed, "method": method, "point": point, "rate": b["rate"],
                             "head_rate": b["head_rate"],
                             "kept_width": b["kept_width"], "kept_widths": b["kept_widths"],
                             "kept_heads": b.get("kept_heads"), "val_accuracy": b["val_accuracy"], **result,
                             "path": b["path"]})
                print(f"seed {seed} point {len(rows)}/{len(points) * len(seeds)}: {method} {point} "
                      f"(p={b['rate']:.3f} h={b['head_rate']:.3f}) accuracy {result['accuracy']:.4f}")

        bench, measured_as = _benchmark(rows, fulls[seeds[0]]["path"], max_length)
        table = results_table(rows, fulls, probes)
        records = [{**record, "data": data["path"]} for record in table.to_dict("records")]
        logged = [tracking.log_point.submit(run_id, row, [b for b in bench["rows"]
                                                          if b["model"] == measured_as[row["path"]]])
                  for row in rows]
        for future in logged:
            future.result()
        summary = summary_table(records)
        tracking.log_benchmark(run_id, bench, records)
        tracking.finish_sweep_run(run_id, records, summary.to_dict("records"), scores)
        printed = summary.to_string(index=False, float_format="%.4f", na_rep="-")
        print(f"data {data['path']}\nMLflow run {run_id} ({tracking.tracking_uri()})\n{printed}")
    except BaseException:
        tracking.fail_run(run_id)  # a crashed sweep must not look "running" in MLflow forever
        raise
    return records


def _benchmark(rows: list[dict], full: str, max_length: int) -> tuple[dict, dict[str, str]]:
    """Latency of each distinct skeleton shape against the full model (seeds and methods that cut the same widths
    and heads share one measurement), copied onto every row. Returns the benchmark and, per skeleton path, the
    path measured for its shape."""
    from skeleton.benchmark import at

    first: dict[tuple, str] = {}
    measured_as = {}
    for row in rows:
        shape = (tuple(row["kept_widths"]), tuple(row["kept_heads"] or ()))
        measured_as[row["path"]] = first.setdefault(shape, row["path"])
    bench = pipeline.benchmark(full, list(first.values()), pipeline.BENCHMARK_BATCH_SIZES, [max_length], repeats=20)
    headline = at(bench, pipeline.BENCHMARK_BATCH_SIZE, max_length)
    for row in rows:
        row.update({key: headline[measured_as[row["path"]]][key] for key in ("speedup", "speedup_bound", "bound_ratio")})
    return bench, measured_as


def _default(name: str) -> str:
    """A parameter's default as help text: the general one, then each backbone's own."""
    def text(value):
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    own = [f"{backbone}: {text(values[name])}" for backbone, values in BACKBONE_DEFAULTS.items() if name in values]
    return "; ".join([text(DEFAULTS[name]), *own])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Skeleton sweep as a Prefect flow (ephemeral server).")
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--backbone", default="minilm", help="registered name or a local checkpoint folder")
    parser.add_argument("--rates", type=float, nargs="+", default=DEFAULT_RATES)
    parser.add_argument("--methods", nargs="+",
                        help="selection methods to compare, or 'all' for every registered one "
                        f"(default: {_default('methods')})")
    parser.add_argument("--head-rates", type=float, nargs="+", default=DEFAULT_HEAD_RATES,
                        help="shares of attention heads to cut as well (each combined with every FFN rate)")
    parser.add_argument("--allocation", default="uniform",
                        help="how kept neurons and heads spread over layers: uniform, global or per_layer")
    parser.add_argument("--target-speedups", type=float, nargs="+", default=[],
                        help="joint budget points: cut FFN neurons and heads until the multiply-adds fall by this "
                        "factor, e.g. 2.0; of the head/FFN mixes that do, the one with the lowest validation loss "
                        "before re-tuning is kept")
    parser.add_argument("--reconstruct", action=argparse.BooleanOptionalAction,
                        help="refit the kept neurons' down-projection columns by least squares so the skeleton's "
                        f"FFN output keeps what the removed neurons added (default: {_default('reconstruct')})")
    parser.add_argument("--tune-norms", action=argparse.BooleanOptionalAction,
                        help="train the backbone's normalisation gains (and biases) with the full model's prompt: "
                        "no longer prompt tuning of a frozen backbone, but a like-for-like baseline for "
                        "--retune-norms; its skeletons inherit them (default: " + _default("tune_norms") + ")")
    parser.add_argument("--retune-norms", action=argparse.BooleanOptionalAction,
                        help="let skeleton re-tuning also train the backbone's normalisation gains (and biases), "
                        "which then belong to the task's expert (default: " + _default("retune_norms") + ")")
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-steps", type=int, help=f"prompt-tuning steps (default: {_default('train_steps')})")
    parser.add_argument("--train-evals", type=int, help="validation checks while prompt-tuning the full model; the "
                        f"best adapter is kept (default: {_default('train_evals')})")
    parser.add_argument("--retune-steps", type=int,
                        help=f"skeleton re-tuning steps (default: {_default('retune_steps')})")
    parser.add_argument("--retune-evals", type=int, help="validation checks while re-tuning a skeleton; the best "
                        f"adapter is kept (default: {_default('retune_evals')})")
    parser.add_argument("--distill", type=float, default=0.0,
                        help="weight of the full model's soft labels when re-tuning a skeleton (0 = off)")
    parser.add_argument("--precision", default="bf16",
                        help="training arithmetic, fp32 or bf16: bf16 autocast is about 1.7x faster on CPUs with "
                        "AVX512-BF16 (use fp32 on CPUs without it); evaluation and exports are always float32")
    parser.add_argument("--attribution-examples", type=int,
                        help=f"training examples to score neurons on (default: {_default('attribution_examples')})")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS,
                        help="training seeds; with several the table shows mean and spread")
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
