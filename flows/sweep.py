"""The Skeleton sweep, end to end, as the Prefect flow `skeleton`.

    per seed: data -> prompt tuning -> attribution (per method) -> skeleton per (method, FFN rate, head rate):
              slice, re-tune, export -> evaluation of every model
    then: interleaved latency vs arithmetic bound per skeleton shape -> MLflow (parent run + child run per point)

The flow's parameters are the fields of flows.config.SweepConfig. Run it with the `skeleton` command:
    skeleton sweep                              # rotten_tomatoes on minilm, rates 0.5 0.65 0.8
    skeleton sweep --task reuters_r8
    skeleton sweep --methods all --seeds 0 1 2  # every selection method, mean and spread over 3 seeds
    skeleton sweep --head-rates 0 0.25 --allocation global --no-reconstruct
    skeleton sweep --data-file my.csv --text-column review --label-column sentiment
or deployed: `prefect deployment run skeleton/full-sweep -p task=reuters_r8`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

# Library progress (training steps, attribution batches) shows in the flow's logs and the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "skeleton")
logging.getLogger("skeleton").setLevel(logging.INFO)

from prefect import flow  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.config import SweepConfig, flow_parameters  # noqa: E402
from tasks import pipeline, prefect_ui, tracking  # noqa: E402
from tasks.report import results_table, summary_table  # noqa: E402

SPLIT_SEED = 0  # the train/validation/test split stays the same whatever the training seeds


def _file_hash(path: str | None) -> str | None:
    """The user file's content hash, so editing the file invalidates the cached data step."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@flow(name="skeleton", log_prints=True, result_serializer="json", task_runner=ThreadPoolTaskRunner(max_workers=1))
@flow_parameters(SweepConfig)
def full_sweep(**parameters) -> list[dict]:
    """Run the sweep and return the results table as records: per seed, the full model, the linear probe and a
    skeleton per (method, FFN rate, head rate) and per (method, target speed-up): the joint budget decides how
    much of the FFN and of the attention heads to cut. Parameters left None take the backbone family's defaults."""
    from skeleton.backbones import resolve_backbone

    config = SweepConfig(**parameters).resolved()  # bad input fails here, before any training starts
    resolve_backbone(config.backbone)
    data_file = config.data_file
    data = pipeline.prepare_data(config.task_name, config.backbone, config.max_length, SPLIT_SEED,
                                 data_file and str(Path(data_file).resolve()), config.text_column,
                                 config.label_column, _file_hash(data_file))
    print(f"data: {data['split_sizes']} labels {data['label_names']}")
    run_id = tracking.start_sweep_run(config.experiment, {**config.params(),
                                                          "artifacts": str(pipeline.artifacts_dir())})
    methods, seeds, prompts = config.methods, config.seeds, config.prompt_methods
    points = [(m, r, h, None) for m in methods for r in config.rates for h in config.head_rates]
    points += [(m, 0.0, 0.0, t) for m in methods for t in config.target_speedups]
    total = len(points) * len(seeds) * len(prompts)
    progress = prefect_ui.sweep_progress(config.task_name, total)  # the Prefect UI's progress bar
    try:
        fulls, probes, finetuned, rows, scores = {}, {}, {}, [], {}
        for seed in seeds:
            probes[seed] = pipeline.linear_probe(data["path"], config.backbone, seed, config.precision)
            if config.finetune:  # the reference a user could pick instead: every weight trained, a model per task
                tuned = pipeline.tune_prompt(data["path"], config.backbone, 0, config.finetune_config(seed))
                finetuned[seed] = {**pipeline.evaluate(data["path"], tuned["path"]), "path": tuned["path"],
                                   "val_accuracy": tuned["val_accuracy"], "prompt": None}
            # The input-prompt full model (the paper's prompt tuning) is every sweep's reference, skeletons cut from it
            # or not: accuracies and speed-ups are also reported against it.
            for prompt in dict.fromkeys(["input", *prompts]):
                full_model = pipeline.tune_prompt(data["path"], config.backbone, config.prompt_length,
                                                  config.train_config(seed), prompt)
                fulls[seed, prompt] = {**pipeline.evaluate(data["path"], full_model["path"]), "path": full_model["path"],
                                       "val_accuracy": full_model["val_accuracy"], "prompt": prompt}
                print(f"seed {seed}: full model ({prompt} prompt) accuracy {fulls[seed, prompt]['accuracy']:.4f}; "
                      f"linear probe {probes[seed]['accuracy']:.4f}")
                if prompt not in prompts:
                    continue

                # Independent sweep points are submitted together: a Dask task runner spreads them over its
                # workers, the default runner takes them one at a time (parallel threads would only fight over cores).
                examples = config.attribution_examples
                futures = {m: pipeline.attribute.submit(data["path"], full_model["path"], m, examples, seed)
                           for m in methods}
                by_method = {m: future.result()["path"] for m, future in futures.items()}
                scores.setdefault(seed, {}).update({f"{prompt}/{m}": path for m, path in by_method.items()})
                teacher = pipeline.teacher_logits(data["path"], full_model["path"])["path"] if config.distill else None
                built = [pipeline.build_skeleton.submit(data["path"], full_model["path"], by_method[m], r,
                                                        config.retune_config(seed), teacher, h, config.allocation,
                                                        config.reconstruct, t)
                         for m, r, h, t in points]
                built = [future.result() for future in built]
                results = [pipeline.evaluate.submit(data["path"], b["path"]) for b in built]
                for (method, _, _, target), b, future in zip(points, built, results):
                    result = future.result()
                    point = f"x{target:g}" if target else f"p={b['rate']:g} h={b['head_rate']:g}"
                    rows.append({"seed": seed, "prompt": prompt, "method": method, "point": point, "rate": b["rate"],
                                 "head_rate": b["head_rate"], "kept_width": b["kept_width"],
                                 "kept_widths": b["kept_widths"], "kept_heads": b.get("kept_heads"),
                                 "val_accuracy": b["val_accuracy"], **result, "path": b["path"]})
                    print(f"seed {seed} point {len(rows)}/{total}: {prompt} {method} {point} "
                          f"(p={b['rate']:.3f} h={b['head_rate']:.3f}) accuracy {result['accuracy']:.4f}")
                    prefect_ui.point_finished(progress, len(rows), total)

        bench, measured_as = _benchmark(rows, fulls, finetuned, config.max_length, config.benchmark_repeats)
        table = results_table(rows, fulls, probes, finetuned)
        records = [{**record, "data": data["path"]} for record in table.to_dict("records")]
        logged = [tracking.log_point.submit(run_id, row, [b for b in bench["rows"]
                                                          if b["model"] == measured_as[row["path"]]])
                  for row in rows]
        for future in logged:
            future.result()
        summary = summary_table(records)
        tracking.log_benchmark(run_id, bench, records)
        tracking.finish_sweep_run(run_id, records, summary.to_dict("records"), scores)
        prefect_ui.sweep_results(config.task_name, summary.to_dict("records"), run_id, config.experiment)
        printed = summary.to_string(index=False, float_format="%.4f", na_rep="-")
        print(f"data {data['path']}\nMLflow run {run_id} ({tracking.tracking_uri()})\n{printed}")
    except BaseException:
        tracking.fail_run(run_id)  # a crashed sweep must not look "running" in MLflow forever
        raise
    return records


def _benchmark(rows: list[dict], fulls: dict, finetuned: dict, max_length: int,
               repeats: int) -> tuple[dict, dict[str, str]]:
    """Latency of each distinct model shape against the input-prompt full model (the paper's baseline) and against
    each prompt method's full model, in a fresh process; seeds and methods that cut the same widths and heads share
    one measurement. Sets on every row `speedup` / `speedup_bound` / `bound_ratio`
    against the full model of its own prompt method (like for like) and `speedup_vs_input` / `bound_vs_input`
    against the input-prompt one. Returns the benchmark and, per model path, the path measured for its shape."""
    from skeleton.benchmark import at

    first_seed = next(iter(fulls))[0]
    own = {prompt: full["path"] for (seed, prompt), full in fulls.items() if seed == first_seed}
    reference = own["input"]
    first: dict[tuple, str] = {}
    measured_as = {}
    shaped = [(row, (row["prompt"], tuple(row["kept_widths"]), tuple(row["kept_heads"] or ()))) for row in rows]
    shaped += [(full, (prompt, "full")) for (_, prompt), full in fulls.items()]
    shaped += [(tuned, ("fine-tuned",)) for tuned in finetuned.values()]
    for row, shape in shaped:
        measured_as[row["path"]] = first.setdefault(shape, row["path"])
    measured = [path for path in first.values() if path != reference]
    bench = pipeline.benchmark(reference, measured, pipeline.BENCHMARK_BATCH_SIZES, [max_length], repeats,
                               baselines=[path for path in own.values() if path != reference])
    headline = at(bench, pipeline.BENCHMARK_BATCH_SIZE, max_length)
    for row, _ in shaped:
        m = headline[measured_as[row["path"]]]
        base = own.get(row.get("prompt"), reference)  # a fine-tuned model has no prompt: against the input one
        speedup, bound = (m["speedup"], m["speedup_bound"]) if base == reference else (m["speedups"][base], m["bounds"][base])
        row.update(speedup=speedup, speedup_bound=bound, bound_ratio=speedup / bound,
                   speedup_vs_input=m["speedup"], bound_vs_input=m["speedup_bound"])
    return bench, measured_as


def dask_runner(address: str):
    """A prefect-dask task runner: an existing cluster's scheduler address, or 'local:N' (N workers)."""
    from prefect_dask import DaskTaskRunner

    if address.startswith("local:"):
        workers = int(address.split(":", 1)[1])
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(address=address)

