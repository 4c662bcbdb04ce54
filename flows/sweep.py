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

import socket
from urllib.parse import urlsplit

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows import search
from flows.config import Point, SweepConfig, flow_parameters
from flows.settings import configure
from tasks import pipeline, prefect_ui, tracking
from tasks.paths import artifacts_dir
from tasks.results import (BENCHMARK_BATCH_SIZE, FINETUNED, FULLS, Row, results_table, set_speedups, summary_table,
                           to_measure)


@flow(name="skeleton", log_prints=True, result_serializer="json", task_runner=ThreadPoolTaskRunner(max_workers=1))
@flow_parameters(SweepConfig)
def full_sweep(**parameters) -> list[dict]:
    """Run the sweep and return the results table as records: per seed, the full model, the linear probe and a
    skeleton per (method, FFN rate, head rate) and per (method, target speed-up): the joint budget decides how
    much of the FFN and of the attention heads to cut. Parameters left None take the backbone family's defaults."""
    from skeleton.backbones import resolve_backbone

    configure()
    config = SweepConfig(**parameters).resolved()  # bad input fails here, before any training starts
    resolve_backbone(config.backbone)
    data = pipeline.prepare_data(config.data_spec())
    print(f"data: {data['split_sizes']} labels {data['label_names']}")
    run_id = tracking.start_sweep_run(config.experiment, {**config.params(), "artifacts": str(artifacts_dir())})
    total = len(config.points()) * len(config.seeds) * len(config.prompt_methods)
    progress = prefect_ui.sweep_progress(config.task_name, total)  # the Prefect UI's progress bar
    try:
        rows, scores, done = [], {}, 0  # rows: every model of the sweep, references and points
        for seed in config.seeds:
            probe = pipeline.linear_probe(config.probe_spec(data["path"], seed))
            rows.append(Row.of_probe(seed, probe, data["path"]))
            if config.finetune:  # the reference a user could pick instead: every weight trained, a model per task
                rows.append(_reference(config, config.finetune_spec(data["path"], seed), seed, "-", FINETUNED))
            # The input-prompt full model (the paper's prompt tuning) is every sweep's reference, skeletons cut from it
            # or not: accuracies and speed-ups are also reported against it.
            fulls = {}
            for prompt in dict.fromkeys(["input", *config.prompt_methods]):
                fulls[prompt] = _reference(config, config.tune_spec(data["path"], seed, prompt), seed, prompt,
                                           FULLS[prompt])
                print(f"seed {seed}: full model ({prompt} prompt) accuracy {fulls[prompt].accuracy:.4f}; "
                      f"linear probe {probe['accuracy']:.4f}")
            rows += fulls.values()
            for prompt in config.prompt_methods:
                grid = _skeletons(config, fulls[prompt], scores.setdefault(seed, {}), progress, done, total)
                rows, done = rows + grid, done + len(grid)
            if config.max_drop is not None:
                rows += _search(config, fulls, rows, scores.setdefault(seed, {}))

        # Latency of each distinct model shape, in a fresh process, against the input-prompt full model (the paper's
        # baseline) and each prompt method's full model; seeds and methods that cut the same widths and heads
        # share one measurement.
        measured = to_measure(rows)
        bench = pipeline.benchmark(config.benchmark_spec(measured))
        set_speedups(rows, measured, bench, BENCHMARK_BATCH_SIZE, config.max_length)
        chosen = search.choose_per_seed(rows, config.max_drop) if config.max_drop is not None else []
        records = results_table(rows).to_dict("records")
        # a child run per model of every seed (the probe has none): a seed's skeletons, its full models (what a
        # seed's choice is judged against, and what it returns when no rate fits) and its fine-tuned one
        logged = [tracking.log_point.submit(run_id, row, [b for b in bench["rows"]
                                                          if b["model"] == measured.measured_as[row.path]])
                  for row in rows if row.path]
        for future in logged:
            future.result()
        summary = summary_table(records)
        report = search.describe(rows, config.max_drop, config.methods[0]) if chosen else ""
        tracking.log_benchmark(run_id, bench, records, config.max_drop)
        tracking.finish_sweep_run(run_id, records, summary.to_dict("records"), scores, report)
        prefect_ui.sweep_results(config.task_name, summary.to_dict("records"), run_id, report)
        shown = summary if chosen else summary.drop(columns="chosen")
        printed = shown.to_string(index=False, float_format="%.4f", na_rep="-")
        print(f"data {data['path']}\nMLflow run {run_id} ({tracking.tracking_uri()})\n{printed}")
        if report:
            print(report)
        print(_where(run_id))
    except BaseException as e:
        tracking.fail_run(run_id, e)  # a crashed or killed sweep must not look "running" in MLflow forever
        raise
    return records


def _where(run_id: str) -> str:
    """Where to look next: the sweep's pages in the MLflow UI (tasks.tracking.ui_pages), a line each."""
    base, start = tracking.ui_base()
    lines = [f"In the MLflow UI{f' (start it: {start})' if start else ''}:"]
    return "\n".join(lines + [f"  {label}: {base}/{page}" for label, page in tracking.ui_pages(run_id).items()])


def _reference(config: SweepConfig, spec, seed: int, prompt: str, method: str) -> Row:
    """A reference model (a full or fine-tuned one) trained by `spec`, then evaluated from its exported folder."""
    trained = pipeline.tune_prompt(spec)
    evaluated = pipeline.evaluate(config.eval_spec(spec.data, trained["path"]))
    return Row.of_reference(seed, prompt, method, trained, evaluated, spec.data)


def _skeletons(config: SweepConfig, full: Row, scores: dict[str, str], progress, done: int, total: int) -> list[Row]:
    """Every sweep point's skeleton cut from `full`: attribution per method, skeletons, their evaluations. Adds the
    scores files to `scores` ("<prompt>/<method>" -> path)."""
    # Independent sweep points are submitted together: a Dask task runner spreads them over its workers, the
    # default runner takes them one at a time (parallel threads would only fight over cores).
    data, points = full.data, config.points()
    futures = {m: pipeline.attribute.submit(config.attribute_spec(data, full.path, m, full.seed))
               for m in config.methods}
    by_method = {m: future.result()["path"] for m, future in futures.items()}
    scores.update({f"{full.prompt}/{m}": path for m, path in by_method.items()})
    teacher = pipeline.teacher_logits(config.teacher_spec(data, full.path))["path"] if config.distill else None
    built = [pipeline.build_skeleton.submit(config.build_spec(data, full.path, by_method[p.method], p, full.seed,
                                                              teacher)) for p in points]
    built = [future.result() for future in built]
    results = [pipeline.evaluate.submit(config.eval_spec(data, b["path"])) for b in built]
    rows = []
    for p, b, future in zip(points, built, results):
        rows.append(Row.of_point(full.seed, full.prompt, p.method, p.target, b, future.result(), data))
        done += 1
        print(f"seed {full.seed} point {done}/{total}: {full.prompt} {p.method} {rows[-1].point} "
              f"(p={b['rate']:.3f} h={b['head_rate']:.3f}) accuracy {rows[-1].accuracy:.4f}")
        prefect_ui.point_finished(progress, done, total)
    return rows


def _search(config: SweepConfig, fulls: dict[str, Row], rows: list[Row], scores: dict[str, str]) -> list[Row]:
    """--max-drop's probes of one seed (flows/search.py): from each full model within the budget, skeletons cut by
    the first selection method at the rates search.next_rate picks, one after another; the grid's points of that
    method count as probes made. Attribution and teacher logits are the grid's (cached stages)."""
    method, lowest = config.methods[0], search.floor(fulls.values(), config.max_drop)
    probes = []
    for prompt, full in fulls.items():
        if not search.passes(full, lowest):
            print(f"seed {full.seed}: no search from the {prompt}-prompt full model: its validation accuracy "
                  f"{full.val_accuracy:.4f} is below the budget's floor {lowest:.4f}")
            continue
        data, seed = full.data, full.seed
        known = [r for r in rows if (r.seed, r.prompt, r.method, r.head_rate) == (seed, prompt, method, 0.0)
                 and r.point.startswith("p=")]
        tried = {r.rate: search.passes(r, lowest) for r in known}
        scores[f"{prompt}/{method}"] = pipeline.attribute(config.attribute_spec(data, full.path, method, seed))["path"]
        teacher = pipeline.teacher_logits(config.teacher_spec(data, full.path))["path"] if config.distill else None
        while (rate := search.next_rate(tried)) is not None:
            spec = config.build_spec(data, full.path, scores[f"{prompt}/{method}"], Point(method, rate, 0.0), seed,
                                     teacher)
            built = pipeline.build_skeleton(spec)
            row = Row.of_point(seed, prompt, method, None, built, pipeline.evaluate(config.eval_spec(data, built["path"])),
                               data)
            tried[rate] = search.passes(row, lowest)
            probes.append(row)
            print(f"seed {seed} search from the {prompt}-prompt full model (validation floor {lowest:.4f}): {method} "
                  f"{row.point} validation {row.val_accuracy:.4f}, {'within' if tried[rate] else 'over'} the budget")
    return probes


def dask_runner(address: str):
    """A prefect-dask task runner: an existing cluster's scheduler address, or 'local:N' (N workers). A scheduler
    that does not answer, or N < 1, fails here, before any work."""
    from prefect_dask import DaskTaskRunner

    if address.startswith("local:"):
        workers = address.split(":", 1)[1]
        if not workers.isdigit() or int(workers) < 1:
            raise ValueError(f"--dask local:N needs N >= 1 workers, got {address!r}: e.g. local:2")
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(workers), "threads_per_worker": 1, "processes": True})
    _check_scheduler(address)
    return DaskTaskRunner(address=address)


def _check_scheduler(address: str, timeout: float = 2.0) -> None:
    """A TCP connection to the scheduler at a tcp:// or tls:// address (or host:port, as Dask reads it; Dask's
    default port 8786); other transports are Dask's to check."""
    url = urlsplit(address if "://" in address else f"tcp://{address}")
    if url.scheme not in ("tcp", "tls"):
        return
    try:
        socket.create_connection((url.hostname, url.port or 8786), timeout=timeout).close()
    except (OSError, ValueError) as e:  # ValueError: a port that is not a number
        raise ValueError(f"no Dask scheduler answers at {address} ({getattr(e, 'strerror', None) or e}): start one "
                         "there (`dask scheduler`), or use --dask local:N") from None
