"""One prepared run on a lent GPU: the library's CUDA checks, then the GPU issue's latency table through
`skeleton benchmark`'s own code path (flows/commands/benchmark.py), written to --out as gpu_bench.md (the table
and every benchmark's report), gpu_bench.json (all rows, checks and timings) and gpu_bench.log.

    python3 -m flows.commands.gpu_bench --out "$OUT"                 # everything, in about 6 minutes on an H200
    python3 -m flows.commands.gpu_bench --out /tmp/g --only checks bert-base --budget 120
    python3 -m flows.commands.gpu_bench --device cpu --tiny --out /tmp/g   # a dry run of the plumbing on a CPU

Steps, in order (STEPS; each skipped when the time left (--budget) is under its estimate, each failure logged and
the next step run):
  checks             on tiny random BERT and LLaMA models: the prefix cache bitwise against the per-forward
                     DynamicCache it replaced; CUDA graphs (padded buckets) and torch.compile against eager, float32
                     and bfloat16; a bf16 BERT with attention pooling; training (fp32 and bf16 autocast), prediction,
                     attribution, activation moments, the linear probe and the joint budget's cut on cuda against
                     the CPU's numbers
  bert-base, llama2-7b (batch 1), bert-base-compile, llama2-7b-compile, minilm-l6, llama2-7b-b32 (batch 32)
                     `skeleton benchmark --demo --random-init --backbone <shape>` (flows/commands/shapes/) in
                     bfloat16, 64 text tokens + 20 prompt vectors: full model, p=0.65 and p=0.9 skeletons, input
                     prompt and prefix, eager and graph; the -compile steps add torch.compile on fewer models
                     (compiling takes 10-35 s per model and shape)
A step that fails with graph or compile in it is rerun eagerly (when time is left), so the table has its row.
With --device cpu --tiny (tests/test_benchmark.py) every step runs on tiny shapes, and the graph and compile steps
fail over to eager as they would on a GPU where capture failed.

Needs torch with CUDA, transformers >= 5.24 and safetensors: no Prefect, MLflow or datasets, no network, no
weights (random weights of real shapes: latency depends on shapes only). docs/benchmark.md says how to run it on a
lent device.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

RATES = (0.65, 0.9)
# name -> (seconds it is expected to take, benchmark options), in order of what the acceptance needs first
TABLE = {
    "bert-base": (40, ["--backbone", "bert-base", "--batch-sizes", "32", "256", "--execution", "eager", "graph"]),
    "llama2-7b": (60, ["--backbone", "llama2-7b", "--batch-sizes", "1", "--execution", "eager", "graph"]),
    "bert-base-compile": (90, ["--backbone", "bert-base", "--batch-sizes", "32", "--rates", "0.65",
                               "--execution", "eager", "graph", "compile"]),
    "llama2-7b-compile": (110, ["--backbone", "llama2-7b", "--batch-sizes", "1", "--rates", "0.65",
                                "--prompt-methods", "input", "--execution", "eager", "graph", "compile"]),
    "minilm-l6": (30, ["--backbone", "minilm-l6", "--batch-sizes", "1", "32", "256", "--execution", "eager", "graph"]),
    "llama2-7b-b32": (60, ["--backbone", "llama2-7b", "--batch-sizes", "32", "--execution", "eager", "graph"]),
}
COMMON = ["--demo", "--random-init", "--dtype", "bfloat16", "--lengths", "64",
          "--prompt-length", "20", "--prompt-methods", "input", "prefix", "--rates", *map(str, RATES),
          "--repeats", "20", "--warmup", "3", "--budget", "20"]
STEPS = {"checks": 45, **{name: seconds for name, (seconds, _) in TABLE.items()}}
BF16 = 2e-2  # bfloat16 logits of graph / compiled execution: |a - b| <= BF16 + BF16 * |b| (8-bit mantissa, 2^-8)
FP32 = 1e-5
DEVICE = "cuda"  # --device: cpu for a dry run
TINY = {"bert": {"model_type": "bert", "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128},
        "llama": {"model_type": "llama", "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                  "max_position_embeddings": 128}}


class Tee:
    """Write to the console and a log file alike."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- checks


class Rows:
    """What the training and attribution loops read of a datasets.Dataset (absent on the device): examples by
    index, columns by name."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return [r[key] for r in self.rows] if isinstance(key, str) else self.rows[key]


def _tiny(family: str, method: str, seed: int = 0):
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    from skeleton.model import AdapterConfig, PromptClassifier

    torch.manual_seed(seed)
    if family == "bert":
        backbone = BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=128))
    else:
        backbone = LlamaModel(LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128))
    model = PromptClassifier(backbone.eval(), AdapterConfig(3, 5, prompt_method=method), seed=seed).eval()
    with torch.no_grad():  # a trained-looking head and query: logits that differ across classes
        model.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
        if model.query is not None:
            model.query.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model


def _ragged(rows: int, width: int, seed: int = 0, vocab: int = 1000):
    """Right-padded random token ids of lengths 1..width."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, width), generator=g)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _diff(got, expected) -> float:
    """max |got - expected| / (1 + |expected|), elementwise: what the stated tolerance bounds."""
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).abs() / (1 + expected.abs())).max().item()


def checks() -> dict:
    import torch

    from skeleton.execution import Runner

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (torch's default; said, not assumed)
    out: dict = {"failed": []}

    def record(name, value, ok):
        out[name] = value
        if not ok:
            out["failed"].append(name)
        log(f"  {'ok ' if ok else 'FAIL'} {name}: {value}")

    ids, mask = _ragged(11, 24)
    with torch.no_grad():
        # 1. The prefix cache against the DynamicCache filled per forward it replaced: bitwise
        from transformers import DynamicCache

        for family in ("bert", "llama"):
            for dtype in (torch.float32, torch.bfloat16):
                model = _tiny(family, "prefix").to(DEVICE, dtype)
                prompt = model.prompt

                def per_forward(backbone, attention_mask, prompt=prompt):
                    b, text = attention_mask.shape
                    cache = DynamicCache()
                    for i, kv in enumerate(prompt.layers):
                        cache.update(kv[0].expand(b, -1, -1, -1), kv[1].expand(b, -1, -1, -1), i)
                    positions = torch.arange(text, device=attention_mask.device).expand(b, -1)
                    return {"attention_mask": torch.cat([attention_mask.new_ones(b, prompt.length), attention_mask],
                                                        1), "position_ids": positions, prompt.cache_kwarg: cache}

                new = model(ids.to(DEVICE), mask.to(DEVICE))
                prompt.backbone_kwargs = per_forward
                old = model(ids.to(DEVICE), mask.to(DEVICE))
                del prompt.backbone_kwargs
                record(f"prefix_cache_bitwise_{family}_{str(dtype)[6:]}", torch.equal(new, old), torch.equal(new, old))

        # 2. CUDA graphs over padded buckets (and torch.compile) against eager
        for family in ("bert", "llama") if DEVICE == "cuda" else ():
            for method in ("input", "prefix"):
                for dtype in (torch.float32, torch.bfloat16):
                    model = _tiny(family, method).to(DEVICE, dtype)
                    expected = model(ids.to(DEVICE), mask.to(DEVICE))
                    runner = Runner(model, "graph", batch_buckets=(2, 4, 8), length_buckets=(16, 32))
                    got = torch.cat([runner(ids[:8], mask[:8]), runner(ids[8:], mask[8:])])  # CPU inputs: copied in
                    tolerance = FP32 if dtype == torch.float32 else BF16
                    d = _diff(got, expected)
                    record(f"graph_vs_eager_{family}_{method}_{str(dtype)[6:]}", round(d, 7), d <= tolerance)
        if DEVICE == "cuda":
            model = _tiny("bert", "prefix").to(DEVICE, torch.bfloat16)
            start = time.perf_counter()
            runner = Runner(model, "compile", batch_buckets=(16,), length_buckets=(32,))
            d = _diff(runner(ids, mask), model(ids.to(DEVICE), mask.to(DEVICE)))
            record("compile_vs_eager_bert_prefix_bfloat16", round(d, 7), d <= BF16)
            out["compile_seconds_tiny"] = round(time.perf_counter() - start, 1)

        # 3. A whole bf16 BERT with attention pooling (the dtype bug)
        model = _tiny("bert", "input").to(DEVICE, torch.bfloat16)
        logits = model(ids.to(DEVICE), mask.to(DEVICE))
        record("bf16_attention_pooling_dtype", str(logits.dtype), logits.dtype == torch.bfloat16)
    _library_steps(record)
    return out


def _library_steps(record) -> None:
    """Training, prediction, attribution, moments, the probe and the budget's cut on cuda, against the CPU."""
    import copy

    from skeleton.attribution import activation_moments, attribute, random_scores
    from skeleton.budget import Candidate, cut
    from skeleton.evaluate import linear_probe
    from skeleton.train import TrainConfig, predict, train

    ids, mask = _ragged(24, 16, seed=1)
    labels = (ids[:, 0] % 2).tolist()
    data = Rows([{"input_ids": row[m.bool()].tolist(), "attention_mask": [1] * int(m.sum()), "label": y}
                 for row, m, y in zip(ids, mask, labels)])
    results = {}
    for device in dict.fromkeys(("cpu", DEVICE)):
        model = _tiny("bert", "prefix").to(device)
        probe_backbone = copy.deepcopy(model.backbone)
        r = {"train": train(model, data, data, 0, TrainConfig(steps=6, eval_every=3, batch_size=8))}
        r["logits"] = predict(model, data, 0)
        for method in ("grad_x_act", "activation", "wanda", "skill"):
            r[method] = attribute(method, model, data, 0, batch_size=8)
        r["moments"] = activation_moments(model, data, 0, batch_size=8)
        r["probe"] = linear_probe(probe_backbone, {"train": data, "validation": data, "test": data}, 0, 2)
        scores = random_scores(model)
        width = len(scores[0])
        r["cut"] = predict(cut(model, scores, [], Candidate([width // 2] * len(scores), [], 0)), data, 0)
        results[device] = r
    cpu, gpu = results["cpu"], results[DEVICE]  # the same run twice on a dry run
    d = _diff(gpu["logits"], cpu["logits"])
    record("trained_logits_cuda_vs_cpu", round(d, 6), d <= 1e-3)
    for method in ("grad_x_act", "activation", "wanda"):
        d = max(_diff(a, b) for a, b in zip(gpu[method], cpu[method]))
        ok = d <= 1e-3 and all(s.device.type == "cpu" for s in gpu[method])
        record(f"{method}_scores_cuda_vs_cpu", round(d, 6), ok)
    d = max(_diff(a[1], b[1]) for a, b in zip(gpu["moments"], cpu["moments"]))
    record("activation_moments_cuda_vs_cpu", round(d, 6), d <= 1e-3)
    record("linear_probe_cuda_vs_cpu", [gpu["probe"]["accuracy"], cpu["probe"]["accuracy"]],
           abs(gpu["probe"]["accuracy"] - cpu["probe"]["accuracy"]) <= 0.1)
    d = _diff(gpu["cut"], cpu["cut"])
    record("budget_cut_cuda_vs_cpu", round(d, 6), d <= 1e-3)
    model = _tiny("llama", "input").to(DEVICE)  # bf16 autocast training on the GPU ("auto" picks it there)
    run = train(model, data, data, 0, TrainConfig(steps=4, eval_every=2, batch_size=8, precision="auto"))
    record("bf16_autocast_training_cuda", run, 0.0 <= run["val_accuracy"] <= 1.0)


# ---------------------------------------------------------------- the table


def bench(name: str, out: Path, eager_only: bool = False, tiny: bool = False) -> dict:
    """One `skeleton benchmark` run (flows.commands.benchmark.main), its result. eager_only: without graph and
    compile. tiny: on a tiny model of the shape's family, few rounds (a dry run)."""
    from flows.commands import benchmark as command

    _, options = TABLE[name]
    folder = out / name
    argv = [*COMMON, *options, "--device", DEVICE, "--out", str(folder)]
    if eager_only:
        at = argv.index("--execution")
        argv = argv[: at + 1] + ["eager"] + [a for a in argv[at + 1:] if a not in ("eager", "graph", "compile")]
    if tiny:
        family = "llama" if "llama" in name else "bert"
        config = out / f"tiny-{family}.json"
        config.write_text(json.dumps(TINY[family]))
        argv += ["--backbone", str(config), "--batch-sizes", "2", "--lengths", "8", "--repeats", "2", "--warmup", "1",
                 "--dtype", "float32", "--prompt-length", "4"]
    log(f"skeleton benchmark {' '.join(argv)}")
    try:
        command.main(argv)
    except SystemExit as e:  # argparse's refusal (e.g. graph without CUDA) is a failed step, not the end
        raise RuntimeError(f"skeleton benchmark refused: exit {e.code}") from None
    result = json.loads((folder / "benchmark.json").read_text())
    result["step"] = name
    return result


def summary(results: list[dict]) -> list[str]:
    """The issue's table: per backbone, batch and execution, the full input-prompt model's latency and every
    model's speed-up against it (same execution, median of per-round ratios), the bound, and the acceptance."""
    names = ["random p=0.65", "random p=0.9", "full (prefix)", "prefix random p=0.65", "prefix random p=0.9"]
    lines = ["| backbone, batch (64 tokens + 20 prompt) | execution | full, input prompt | p=0.65 | p=0.9 | prefix full "
             "| prefix p=0.65 | prefix p=0.9 | bound p=0.65 | prefix / input, p=0.65 | full / eager |",
             "|" + "---|" * 11]
    verdicts = []
    seen = set()
    for result in results:
        backbone = result["step"].removesuffix("-compile").removesuffix("-b32")
        for b in sorted({r["batch_size"] for r in result["rows"]}):
            for mode in result["environment"]["executions"]:
                if (backbone, b, mode) in seen:
                    continue
                seen.add((backbone, b, mode))
                rows = {r["model"]: r for r in result["rows"] if r["batch_size"] == b and r["execution"] == mode}
                full = rows["full"]
                cells = [f"{backbone}, batch {b}", mode, f"{full['latency_ms']:.3g} ms"]
                cells += [f"{rows[n]['speedup']:.2f}x" if n in rows else "" for n in names]
                cut = rows.get("random p=0.65")
                cells.append(f"{cut['speedup_bound']:.2f}" if cut else "")
                prefix = rows.get("prefix random p=0.65")
                same_width = prefix["speedup"] / cut["speedup"] if prefix and cut else None
                cells.append(f"{same_width:.2f}" if same_width else "")
                cells.append(f"{full['execution_speedup']:.2f}" if full.get("execution_speedup") else "")
                lines.append("| " + " | ".join(cells) + " |")
                if cut and mode != "eager":
                    target = {"bert-base": (32, 1.35), "llama2-7b": (1, 1.5)}.get(backbone)
                    if target and b == target[0]:
                        verdicts.append((f"{backbone} batch {b}, {mode}: p=0.65 at {cut['speedup']:.2f}x "
                                         f"(target {target[1]}x, bound {cut['speedup_bound']:.2f})",
                                         cut["speedup"] >= target[1]))
                if same_width:
                    verdicts.append((f"{backbone} batch {b}, {mode}: prefix p=0.65 / input p=0.65 = {same_width:.2f} "
                                     "(no slower: >= 1)", same_width >= 1.0))
    lines += ["", "Acceptance (GPU issue):", ""]
    lines += [f"- {'PASS' if ok else 'not met'}: {text}" for text, ok in verdicts]
    return lines


def write(out: Path, state: dict) -> None:
    from skeleton.benchmark import markdown

    (out / "gpu_bench.json").write_text(json.dumps(state, indent=1, default=str))
    md = ["# The GPU issue's table, re-measured", "", f"{state['environment']}", ""]
    if state.get("checks"):
        failed = state["checks"].get("failed", [])
        md += [f"Checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)} (gpu_bench.json, "
               f"\"checks\"; bf16 tolerance {BF16} + {BF16} x |logit|, fp32 {FP32}).", ""]
    if state["results"]:
        md += summary(state["results"]) + [""]
    for step, seconds in state["seconds"].items():
        md.append(f"- {step}: {seconds} s" + (f" ({state['errors'][step]})" if step in state["errors"] else ""))
    for result in state["results"]:
        md += ["", markdown(result, f"{result['step']}: full model vs skeletons")]
    (out / "gpu_bench.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_bench")))
    parser.add_argument("--budget", type=float, default=420, help="seconds for all steps (a step that would not fit "
                        "is skipped); the run stops itself 60 s after it")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="these steps only")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few rounds: a dry run of the plumbing")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)

    def overdue(*_):
        raise TimeoutError(f"gpu_bench ran past --budget {args.budget:.0f} s + 60 s")

    saved = sys.stdout, sys.stderr, signal.signal(signal.SIGALRM, overdue)
    with (args.out / "gpu_bench.log").open("w") as logfile:
        sys.stdout, sys.stderr = Tee(sys.__stdout__, logfile), Tee(sys.__stderr__, logfile)
        signal.alarm(int(args.budget) + 60)
        try:
            return run(args)
        finally:
            signal.alarm(0)
            sys.stdout, sys.stderr = saved[:2]
            signal.signal(signal.SIGALRM, saved[2])


def run(args) -> int:
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch
    import torch._dynamo
    import transformers

    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA GPU; torch sees none")
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "a CPU (dry run)"
    environment = (f"{name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                   f"transformers {transformers.__version__}, Python {platform.python_version()}, "
                   f"{os.cpu_count()} host cores")
    log(environment)
    state = {"environment": environment, "checks": {}, "results": [], "seconds": {}, "errors": {}}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_bench-"))
    for step, estimate in STEPS.items():
        if args.only and step not in args.only:
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < estimate:
            log(f"skip {step}: {left:.0f} s left, it takes about {estimate} s")
            state["errors"][step] = f"skipped: {left:.0f} s left"
            continue
        log(f"step {step} (about {estimate} s; {left:.0f} s left)")
        t0 = time.perf_counter()
        try:
            if step == "checks":
                state["checks"] = checks()
            else:
                try:
                    state["results"].append(bench(step, tmp, tiny=args.tiny))
                except Exception:
                    traceback.print_exc()
                    state["errors"][step] = "failed with graph/compile: " + traceback.format_exc(limit=1)[-300:]
                    if args.budget - (time.perf_counter() - started) > estimate / 2:
                        log(f"rerun {step} eagerly")
                        gc.collect()
                        state["results"].append(bench(step, tmp, eager_only=True, tiny=args.tiny))
        except Exception:
            traceback.print_exc()
            state["errors"][step] = traceback.format_exc(limit=2)[-600:]
        finally:
            state["seconds"][step] = round(time.perf_counter() - t0, 1)
            log(f"step {step}: {state['seconds'][step]} s")
            torch._dynamo.reset()  # compiled graphs and their CUDA-graph memory
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            write(args.out, state)
    state["seconds"]["total"] = round(time.perf_counter() - started, 1)
    write(args.out, state)
    print("\n".join(summary(state["results"])) if state["results"] else "no table rows", flush=True)
    log(f"done in {state['seconds']['total']} s: {args.out}/gpu_bench.md, gpu_bench.json, gpu_bench.log")
    return 1 if state["checks"].get("failed") or state["errors"] else 0

if __name__ == "__main__":
    sys.exit(main())
