"""Latency of the full model against its skeletons, beside the arithmetic bound: no Prefect, no MLflow needed.
`skeleton benchmark` runs it (flows/cli.py); `python -m flows.commands.benchmark` too.

    skeleton benchmark                           # the latest sweep's skeletons, else demo skeletons
    skeleton benchmark --from-sweep --method grad_x_act --rates 0.5 0.65 0.8
    skeleton benchmark --skeletons artifacts/models/<hash> artifacts/skeletons/<hash> ...
    skeleton benchmark --demo --backbone minilm  # no training: random neurons cut from the packaged model
    skeleton benchmark --device cuda --out /tmp/bench
    skeleton benchmark --demo --random-init --backbone bert-base --prompt-methods input prefix --rates 0.65 0.9 \
        --device cuda --dtype bfloat16 --execution eager graph compile --batch-sizes 32 --lengths 64

--skeletons takes exported folders; the one with rate 0 is the reference. --from-sweep (and the default)
reads the latest finished sweep in MLflow (its results.parquet), else scans the artifacts folder for skeletons
of --method at --rates and the newest rate-0 model; the default builds demo skeletons if neither has them.
--demo builds a full model and skeletons at --rates from --backbone with random neuron selection and an
untrained prompt and head (the speed of a dense forward pass depends neither on which neurons are kept nor on
weight values), one set per --prompt-methods. With --random-init the weights are random and only the shape is
read: --backbone is then also a config.json file, or a shape shipped in flows/commands/shapes/ (SHAPES:
minilm-l6, bert-base, llama2-7b); the models are built in memory on --device in --dtype (no export, no
tokenizer: the timing inputs are random token ids), so a 7B shape never passes through the CPU.
--execution times every model eagerly and/or as CUDA graphs ("graph", CUDA only) and/or torch.compile'd
("compile"), side by side in one report (skeleton/execution.py). Prints the report and writes benchmark.md,
benchmark.csv and benchmark.json to --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time
from pathlib import Path

from skeleton.folder import SkeletonFolder, model_name
from tasks.paths import artifacts_dir
from tasks.results import latest_sweep, main_full  # plain Python: no Prefect, no MLflow

SHAPES = Path(__file__).parent / "shapes"  # backbone shapes for --random-init: <name>.json, hand-written configs


def from_mlflow(experiment: str, method: str, rates: list[float]) -> dict[str, Path] | None:
    """Full model + `method` skeletons at `rates` from the latest finished sweep's results table, if any."""
    try:
        found = latest_sweep(experiment)
    except ImportError:  # e.g. a GPU machine with torch and transformers only
        return None
    if found is None:
        return None
    rows, run_id = found
    # The first seed's models (every seed's have the same shapes), FFN-only skeletons (the rates name them), of the
    # reference full model's prompt method.
    rows = [r for r in rows if r.seed == rows[0].seed and not r.head_rate]
    reference = main_full(rows)
    points = {r.rate: r for r in rows if r.method == method and r.prompt == reference.prompt}
    folders = {"full": reference.path, **{points[rate].name(): points[rate].path for rate in rates if rate in points}}
    if len(folders) < len(rates) + 1 or not all(Path(p).is_dir() for p in folders.values()):
        return None
    print(f"skeletons of MLflow sweep run {run_id} ({experiment})")
    return {name: Path(p) for name, p in folders.items()}


def from_artifacts(root: Path, method: str, rates: list[float]) -> dict[str, Path] | None:
    """The newest set of skeletons made from one attribution at all `rates`, preferring `method`'s, and the
    newest rate-0 model of the same architecture: for a sweep that never reached MLflow."""
    groups: dict[str, dict[float, SkeletonFolder]] = {}
    methods: dict[str, str | None] = {}
    for folder in SkeletonFolder.find([root / "skeletons"]):
        meta = folder.meta()
        if meta.get("rate") in rates and not meta.get("head_rate"):
            key = str(meta.get("scores"))
            groups.setdefault(key, {})[meta["rate"]] = folder
            methods[key] = meta["method"]
    complete = [k for k, g in groups.items() if len(g) == len(rates)]
    if not complete:
        return None
    newest = lambda k: max(f.path.stat().st_mtime for f in groups[k].values())  # noqa: E731
    key = max(complete, key=lambda k: (methods[k] == method, methods[k] is None, newest(k)))

    def architecture(folder: SkeletonFolder):  # a full model of the skeletons' own backbone, not of another one
        config = folder.config()
        return config.get("hidden_size"), config.get("num_hidden_layers"), config.get("vocab_size")

    skeleton_architecture = architecture(next(iter(groups[key].values())))
    full = [f for f in SkeletonFolder.find([root / "models"])
            if f.meta().get("rate") == 0 and architecture(f) == skeleton_architecture]
    if not full:
        return None
    if methods[key] not in (method, None):
        print(f"note: no {method} skeletons at these rates; using {methods[key]}'s")
    print(f"skeletons from {root} (scores {key}, method {methods[key] or 'not recorded'})")
    return {"full": max(full, key=lambda f: f.path.stat().st_mtime).path,
            **{model_name(f.meta(), f.path, style="label"): f.path for f in map(groups[key].get, rates)}}


def build_demo(backbone: str, rates: list[float], prompt_length: int, seed: int,
               prompt_methods: tuple[str, ...] = ("input",)) -> dict[str, Path]:
    """A full model and skeletons at `rates` per prompt method, random neurons kept, untrained prompt and head,
    exported; reused when built. (--random-init builds in memory instead: demo_models.)"""
    import torch

    from skeleton.attribution import random_scores
    from skeleton.backbones import family_of, load_backbone
    from skeleton.io import stable_hash
    from skeleton.model import AdapterConfig, PromptClassifier
    from skeleton.prune import slice_ffn
    from skeleton.selection import select

    spec = dict(backbone=str(backbone), rates=rates, prompt_length=prompt_length, random_init=False, seed=seed)
    if tuple(prompt_methods) != ("input",):
        spec["prompt_methods"] = list(prompt_methods)
    root = artifacts_dir() / "benchmark" / "demo" / stable_hash(spec)
    names = {}
    for method in prompt_methods:
        sub = "" if method == "input" else f"{method}-"
        names[demo_name(method)] = root / f"{sub}full"
        names |= {demo_name(method, rate): root / f"{sub}p{rate}" for rate in rates}
    if all(SkeletonFolder(folder).exists() for folder in names.values()):
        return names
    model_backbone, tokenizer = load_backbone(backbone)
    demo = {"demo": "random neurons, untrained prompt and head: for timing only", **spec}
    full_keep = [torch.arange(b.down.in_features) for b in family_of(model_backbone).ffn_blocks(model_backbone)]
    for method in prompt_methods:
        model = PromptClassifier(model_backbone, AdapterConfig(num_labels=2, prompt_length=prompt_length,
                                                              prompt_method=method), seed=seed)
        meta = {**demo, "prompt_method": method}
        SkeletonFolder.export(model, tokenizer, full_keep, names[demo_name(method)], {"rate": 0.0, **meta})
        scores = random_scores(model, seed=seed)
        for rate in rates:
            skeleton = copy.deepcopy(model)
            keep = select(scores, rate)
            slice_ffn(skeleton.backbone, keep)
            SkeletonFolder.export(skeleton, tokenizer, keep, names[demo_name(method, rate)],
                                  {"rate": rate, "kept_width": len(keep[0]), "method": "random", **meta})
    return names


def demo_name(prompt_method: str, rate: float | None = None) -> str:
    """"full", "full (prefix)", "random p=0.65", "prefix random p=0.65": the label a demo model is reported by."""
    meta = {"rate": rate or 0.0, "prompt_method": prompt_method, "method": "random" if rate else None}
    return model_name(meta, style="label")


def shape_config(backbone: str) -> Path:
    """The config.json a random-init demo reads: a .json file, a shape in SHAPES, or a registered backbone's or a
    checkpoint folder's own."""
    from skeleton.backbones import resolve_backbone

    path = Path(backbone)
    if path.suffix == ".json" and path.is_file():
        return path
    if (SHAPES / f"{backbone}.json").is_file():
        return SHAPES / f"{backbone}.json"
    try:
        return resolve_backbone(backbone) / "config.json"
    except ValueError as e:
        shapes = ", ".join(sorted(p.stem for p in SHAPES.glob("*.json")))
        raise ValueError(f"{e}; with --random-init also a config.json file or a shape: {shapes}") from None


def demo_models(backbone: str, rates: list[float], prompt_length: int = 20, seed: int = 0,
                prompt_methods: tuple[str, ...] = ("input",), device: str = "cpu", dtype: str = "float32") -> dict:
    """name -> PromptClassifier: a randomly initialised backbone of `backbone`'s shape (shape_config), its
    skeletons at `rates` (random neurons kept), an untrained prompt and head per prompt method; built on `device`
    in `dtype`. The models of one width share one backbone."""
    import torch
    from transformers import AutoConfig, AutoModel

    from skeleton.attribution import random_scores
    from skeleton.benchmark import DTYPES
    from skeleton.model import AdapterConfig, PromptClassifier
    from skeleton.prune import slice_ffn
    from skeleton.selection import select

    config = AutoConfig.from_pretrained(shape_config(backbone))
    torch.manual_seed(seed)
    with torch.device(device):
        full = AutoModel.from_config(config, dtype=DTYPES[dtype]).eval()

    def classifier(model_backbone, method):
        adapter = AdapterConfig(num_labels=2, prompt_length=prompt_length, prompt_method=method)
        return PromptClassifier(model_backbone, adapter, seed=seed).eval()

    models = {demo_name(method): classifier(full, method) for method in prompt_methods}
    scores = random_scores(next(iter(models.values())), seed=seed)
    for rate in rates:
        cut = slice_ffn(copy.deepcopy(full), [k.to(device) for k in select(scores, rate)])
        models |= {demo_name(method, rate): classifier(cut, method) for method in prompt_methods}
    return models


def skeleton_folders(paths: list[str]) -> dict[str, Path]:
    """Name each folder by its rate, method and prompt method (model_name); the input-prompt full model (rate 0, not
    fine-tuned) is the reference, listed first as "full"."""
    named, reference = {}, []
    for folder in map(SkeletonFolder, paths):
        label = model_name(folder.meta(), folder.path, style="label")
        name = label if label not in named else f"{label} ({folder.path.name})"
        named[name] = folder.path
        if label == "full":
            reference.append(name)
    if len(reference) != 1:
        raise SystemExit("--skeletons needs exactly one input-prompt full model (rate 0) among the folders, "
                         f"found {len(reference)}")
    return {"full": named.pop(reference[0]), **named}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--skeletons", nargs="+", metavar="DIR", help="exported folders, one of them rate 0")
    source.add_argument("--from-sweep", action="store_true", help="the latest sweep's skeletons (else an error)")
    source.add_argument("--demo", action="store_true", help="build demo skeletons from --backbone (no training)")
    parser.add_argument("--method", default="grad_x_act", help="selection method of the sweep's skeletons")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.65, 0.8])
    parser.add_argument("--experiment", default="skeleton", help="MLflow experiment of the sweeps")
    parser.add_argument("--backbone", default="minilm", help="demo: registered backbone or checkpoint folder")
    parser.add_argument("--random-init", action="store_true",
                        help="demo: random weights of the backbone's shape, built in memory; --backbone may then be "
                             "a config.json or a shape: " + ", ".join(sorted(p.stem for p in SHAPES.glob("*.json"))))
    parser.add_argument("--prompt-length", type=int, default=20, help="demo: soft prompt vectors")
    parser.add_argument("--prompt-methods", nargs="+", default=["input"], choices=["input", "prefix"],
                        help="demo: a full model and skeletons per prompt method")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--execution", nargs="+", default=["eager"], choices=["eager", "graph", "compile"],
                        help="how each model runs, side by side: eagerly, as CUDA graphs (CUDA only), torch.compile'd")
    parser.add_argument("--compile-mode", help="torch.compile mode for --execution compile (default: "
                        "reduce-overhead on CUDA, default on a CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; always recorded)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128], help="text tokens (+ the prompt)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per configuration (at most)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per model and configuration (+1)")
    parser.add_argument("--budget", type=float, default=15.0,
                        help="seconds of timed rounds per configuration: fewer rounds (not under 5) past it; 0 = none")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="report folder (default artifacts/benchmark/<UTC time>)")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from skeleton.benchmark import BenchmarkConfig, benchmark, benchmark_folders

    hf_logging.disable_progress_bar()  # loading / writing bars would bury the report

    try:
        config = BenchmarkConfig(batch_sizes=tuple(args.batch_sizes), lengths=tuple(args.lengths),
                                 repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                                 threads=args.threads, budget_s=args.budget or None, memory=not args.no_memory,
                                 seed=args.seed, executions=tuple(args.execution), compile_mode=args.compile_mode)
    except ValueError as e:  # bad settings, or no GPU for --device cuda: say so before loading anything
        parser.error(str(e))
    if args.backbone.endswith(".json") and not args.random_init:
        parser.error("a config.json holds no weights: add --random-init (or pass a checkpoint folder)")
    started = time.perf_counter()
    methods = tuple(dict.fromkeys(args.prompt_methods))
    folders = None
    if args.skeletons:
        folders = skeleton_folders(args.skeletons)
    elif not args.demo:
        folders = (from_mlflow(args.experiment, args.method, args.rates)
                   or from_artifacts(artifacts_dir(), args.method, args.rates))
        if folders is None and args.from_sweep:
            raise SystemExit(f"no finished sweep with {args.method} skeletons at rates {args.rates} in MLflow or "
                             f"{artifacts_dir()}: run `make sweep`, or pass --skeletons / --demo")
        if folders is None:
            print(f"no sweep skeletons found: building demo skeletons from {args.backbone}")
    if folders is None and args.random_init:  # a demo of the shape alone: built in memory, on the device
        try:
            models = demo_models(args.backbone, args.rates, args.prompt_length, args.seed, methods, args.device,
                                 args.dtype)
        except ValueError as e:
            raise SystemExit(f"--backbone {args.backbone}: {e}") from None
        print(f"demo models of {args.backbone}'s shape, random weights: {', '.join(models)}")
        result = benchmark(models, config, reference=demo_name(methods[0]),
                           baselines=[demo_name(m) for m in methods[1:]])
        result["environment"]["backbone"] = args.backbone
        return report(result, args.out, started)
    if folders is None:
        folders = build_demo(args.backbone, args.rates, args.prompt_length, args.seed, methods)
    for name, folder in folders.items():
        print(f"  {name}: {folder}")
    result = benchmark_folders({name: str(path) for name, path in folders.items()}, config, reference="full",
                               baselines=[n for n in folders if n.startswith("full (")])  # the other prompts' fulls
    return report(result, args.out, started)


def report(result: dict, out: Path | None, started: float) -> int:
    from skeleton.benchmark import markdown, write_report

    result["environment"]["seconds"] = round(time.perf_counter() - started, 1)
    out = out or artifacts_dir() / "benchmark" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    paths = write_report(result, out)
    print(markdown(result))
    print(f"report: {', '.join(str(p) for p in paths.values())} ({result['environment']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
