"""Latency of a full model against its skeletons, measured so the numbers can be trusted, beside the arithmetic
bound on the speed-up.

    result = benchmark({"full": full, "p0.5": skeleton}, BenchmarkConfig(batch_sizes=(32,), lengths=(64,)))
    result["rows"]          one row per (model, execution, batch size, text length); result["environment"]: where

Execution (BenchmarkConfig.executions, skeleton/execution.py): "eager", the model called as every stage calls it;
"graph", CUDA-graph replay of each configuration's shape; "compile", torch.compile. Every model runs in every
execution in the same rounds; a row's speed-up is against the reference in the same execution, and its
"execution_speedup" against the same model run eagerly, so eager and graph stand side by side with the bound. A
non-eager model is captured / compiled before its warm-up (seconds in the row's "prepare_s"), and its passes
include copying the inputs in and the logits out, as a server's do.

Timing: per configuration every model gets `warmup` + 1 passes that do not count (the last one sizes the
rounds against `budget_s`), then `repeats` rounds in which every model runs once, the order rotated each round:
interleaved in one process, so machine noise hits all models alike. Latency is the median (p10, p90) of the
per-pass times; speed-up is the median (p10, p90) of the per-round ratios, reference time over model time.
Torch's CPU thread count is fixed for the run and recorded. On CUDA each pass is timed with CUDA events on an
idle stream.

Bound: the multiply-adds (MACs) of one forward pass, counted from the modules' actual shapes, so pruned heads
and per-layer FFN widths count as they are. bound = MACs(reference) / MACs(model) is the speed-up if time were
proportional to matrix work; measured / bound says how much of it the machine delivers. It can exceed 1: a
narrower FFN keeps a smaller working set in cache and runs more MACs per second.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skeleton.execution import MODES, Runner, check_mode
from skeleton.macs import count_macs
from skeleton.model import PromptClassifier

BUSY = 0.85  # below this share of CPU time per thread and wall second, other programs held the cores
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchmarkConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    lengths: tuple[int, ...] = (32, 64, 128)  # text tokens; each model's soft prompt comes on top
    repeats: int = 20  # timed rounds per configuration, every model once per round
    warmup: int = 3  # passes per model and configuration that do not count (+1 that sizes the rounds)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads for the run; None keeps torch's default (recorded either way)
    budget_s: float | None = None  # per configuration: fewer rounds (not under min_repeats) if they would take longer
    min_repeats: int = 5
    memory: bool = True  # also measure each eager forward's peak memory (one more, untimed pass)
    seed: int = 0
    executions: tuple[str, ...] = ("eager",)  # skeleton.execution.MODES, each model timed in each
    compile_mode: str | None = None  # torch.compile's mode for "compile" (default: the Runner's)

    def __post_init__(self):
        for name in ("batch_sizes", "lengths"):
            values = tuple(int(v) for v in getattr(self, name))
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)
        if self.repeats < 1 or self.warmup < 0 or self.min_repeats < 1:
            raise ValueError(f"need repeats >= 1, min_repeats >= 1 and warmup >= 0: {self}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive (or None for torch's default), got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        kind = torch.device(self.device).type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but torch {torch.__version__} sees no CUDA device")
        executions = tuple(dict.fromkeys(self.executions))
        if not executions:
            raise ValueError(f"executions must name at least one of {', '.join(MODES)}")
        for mode in executions:
            check_mode(mode, self.device)
        object.__setattr__(self, "executions", executions)


# ---------------------------------------------------------------- timing and memory


def _inputs(vocab_size: int, batch_size: int, length: int, device: torch.device, seed: int):
    low = min(1000, vocab_size // 2)  # ordinary tokens, clear of the special ones at the start of the vocabulary
    ids = torch.randint(low, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device), torch.ones_like(ids, device=device)


def _timed_pass(model: nn.Module, ids, mask, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward pass. CPU time well under threads x wall
    means the pass waited: on a shared machine, for cores other programs held."""
    cpu = time.process_time()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # start on an idle stream: the pass's own latency, nothing queued before it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(ids, mask)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, time.process_time() - cpu
    start = time.perf_counter()
    model(ids, mask)
    return time.perf_counter() - start, time.process_time() - cpu


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _peak_bytes(passes: dict, device: torch.device) -> dict:
    """Peak memory of each pass (key -> zero-argument callable) above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated after a reset, minus the allocation before the pass (weights, inputs).
    CPU: one torch.profiler session with profile_memory; for each pass, the running sum of the CPU allocator's
    allocation and free events inside its record_function range, maximised: the largest set of tensors
    (activations, temporaries) live at once. Memory a library allocates outside PyTorch's allocator (e.g. oneDNN
    scratch space) is not seen.
    """
    if device.type == "cuda":
        peaks = {}
        for key, run in passes.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            torch.cuda.synchronize(device)
            peaks[key] = torch.cuda.max_memory_allocated(device) - before
        return peaks
    from torch.profiler import ProfilerActivity, profile, record_function

    labels = {f"skeleton.benchmark::{i}": key for i, key in enumerate(passes)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for label, key in labels.items():
            with record_function(label):
                passes[key]()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    peaks = {}
    for event in events:
        if event.name() in labels:
            live = peak = 0
            for m in memory:
                if event.start_ns() <= m.start_ns() <= event.end_ns():
                    live += m.nbytes()
                    peak = max(peak, live)
            peaks[labels[event.name()]] = peak
    return peaks


def _load() -> float | None:
    """The 1-minute load average (recorded; it lags, so the busy-machine check uses CPU time instead)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment(config: BenchmarkConfig, models: dict[str, PromptClassifier]) -> dict:
    import transformers

    device = torch.device(config.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    env = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": config.device,
        "device_name": name, "dtype": config.dtype, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "attention": sorted({str(m.backbone.config._attn_implementation) for m in models.values()}),
        "repeats": config.repeats, "warmup": config.warmup, "budget_s": config.budget_s,
        "load_before": _load(), "executions": list(config.executions),
    }
    if "compile" in config.executions:
        env["compile_mode"] = config.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()  # "highest": no TF32 on a GPU
    return env


# ---------------------------------------------------------------- the benchmark


@torch.no_grad()
def _configuration(models: dict[str, PromptClassifier], reference: str, batch_size: int, length: int,
                   config: BenchmarkConfig, device: torch.device, baselines: Sequence[str] = (),
                   runners: dict | None = None) -> list[dict]:
    """Rows of one (batch size, text length): every model in every execution, timed in the same rounds.
    runners: (model, execution) -> a callable running the model that way (default: the model itself, eagerly)."""
    runners = runners or {}
    entries = [(name, mode) for mode in config.executions for name in models]  # rows: by execution, then model
    run = {(name, mode): runners.get((name, mode), models[name]) for name, mode in entries}
    vocab = models[reference].backbone.config.vocab_size
    ids, mask = _inputs(vocab, batch_size, length, device, config.seed)
    round_s = 0.0
    for entry in entries:
        if isinstance(run[entry], Runner):
            run[entry].prepare([(batch_size, length)])  # capture / compile: not timed
        for _ in range(config.warmup):
            run[entry](ids, mask)
        round_s += _timed_pass(run[entry], ids, mask, device)[0]  # one more warm pass: the round's cost
    repeats = config.repeats
    if config.budget_s is not None:
        repeats = min(repeats, max(config.min_repeats, int(config.budget_s / max(round_s, 1e-9))))
    times: dict[tuple, list[float]] = {entry: [] for entry in entries}
    cpu: dict[tuple, list[float]] = {entry: [] for entry in entries}
    for r in range(repeats):
        for entry in entries[r % len(entries):] + entries[: r % len(entries)]:
            wall, used = _timed_pass(run[entry], ids, mask, device)
            times[entry].append(wall)
            cpu[entry].append(used)
    ref_macs = count_macs(models[reference], batch_size, length).total
    on_cpu, rows = device.type == "cpu", []
    for name, mode in entries:
        model, own = models[name], times[name, mode]
        ref_times, seconds = times[reference, mode], statistics.median(own)
        # Paired: the reference's time over the model's in the same round; a burst of other work that hits one
        # side of a round moves that round's ratio only, and the median drops it.
        ratios = [a / b for a, b in zip(ref_times, own)]
        speedup, macs = statistics.median(ratios), count_macs(model, batch_size, length).total
        runner = run[name, mode]
        rows.append({
            "model": name, "execution": mode, "batch_size": batch_size, "text_tokens": length,
            "seq_len": length + model.prompt_positions, "repeats": repeats,
            "latency_ms": 1e3 * seconds, "latency_p10_ms": 1e3 * _percentile(own, 0.1),
            "latency_p90_ms": 1e3 * _percentile(own, 0.9),
            "cpu_ms": 1e3 * statistics.median(cpu[name, mode]) if on_cpu else None,
            "throughput": batch_size / seconds,
            "speedup": speedup, "speedup_p10": _percentile(ratios, 0.1), "speedup_p90": _percentile(ratios, 0.9),
            # By CPU time: with one thread, what the speed-up would be on an idle machine (others' load drops out)
            "cpu_speedup": statistics.median(cpu[reference, mode]) / statistics.median(cpu[name, mode])
            if on_cpu else None,
            "gmacs": macs / 1e9, "speedup_bound": ref_macs / macs, "bound_ratio": speedup * macs / ref_macs,
            "parameters": model.num_parameters(),
            # against each baseline (e.g. the full model of each prompt method), in the same execution, paired
            "speedups": {b: statistics.median([a / t for a, t in zip(times[b, mode], own)]) for b in baselines},
            "bounds": {b: count_macs(models[b], batch_size, length).total / macs for b in baselines},
            # the same model run eagerly over this execution, paired per round
            "execution_speedup": statistics.median([a / t for a, t in zip(times[name, "eager"], own)])
            if mode != "eager" and (name, "eager") in times else None,
            "prepare_s": runner.prepared.get((batch_size, length)) if isinstance(runner, Runner) else None,
        })
    return rows


def benchmark(models: dict[str, PromptClassifier], config: BenchmarkConfig = BenchmarkConfig(),
              reference: str | None = None, baselines: Sequence[str] = ()) -> dict:
    """Time every model over the grid of batch sizes x text lengths against `reference` (default: the first), and
    against each of `baselines` (rows' "speedups" and "bounds": baseline -> value).

    Moves the models to the configured device and dtype (in place). Returns {"environment": ..., "rows": [...]},
    JSON-able: a row per (batch size, text length, model) with latency, throughput (examples/s), speed-up and its
    arithmetic bound, parameters and, with config.memory, the forward's peak memory (peak_mem_mb)."""
    reference = reference or next(iter(models))
    for name in (reference, *baselines):
        if name not in models:
            raise KeyError(f"reference {name!r} is not one of the models: {', '.join(models)}")
    device, threads = torch.device(config.device), torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        for model in models.values():
            model.to(device=device, dtype=DTYPES[config.dtype]).eval()
        env = environment(config, models)
        grid = [(b, n) for b in config.batch_sizes for n in config.lengths]
        # One runner per model and execution, its buckets the grid's own shapes (no padding), prepared on first use
        runners = {(name, mode): Runner(model, mode, config.batch_sizes, config.lengths,
                                        compile_mode=config.compile_mode)
                   for mode in config.executions if mode != "eager" for name, model in models.items()}
        rows = [row for b, n in grid
                for row in _configuration(models, reference, b, n, config, device, baselines, runners)]
        del runners  # their graphs' memory, before the memory pass
        if config.memory:
            inputs = {(b, n): _inputs(models[reference].backbone.config.vocab_size, b, n, device, config.seed)
                      for b, n in grid}
            passes = {(name, b, n): (lambda m=model, x=inputs[b, n]: m(*x))
                      for b, n in grid for name, model in models.items()}
            with torch.no_grad():
                peaks = _peak_bytes(passes, device)
            for row in rows:  # eager passes only: a graph's memory is its pool's, held from capture on
                if row["execution"] == "eager":
                    row["peak_mem_mb"] = peaks[row["model"], row["batch_size"], row["text_tokens"]] / 2**20
        env["load_after"] = _load()
        if device.type == "cpu":  # torch's threads spin while they wait for work: an idle machine gives them ~100%
            shares = [r["cpu_ms"] / (env["threads"] * r["latency_ms"]) for r in rows]
            env["cpu_share"] = round(statistics.median(shares), 3)
    finally:
        torch.set_num_threads(threads)
    return {"environment": env, "rows": rows}


def benchmark_folders(folders: dict[str, str | Path], config: BenchmarkConfig = BenchmarkConfig(),
                      reference: str | None = None, baselines: Sequence[str] = ()) -> dict:
    """`benchmark` over exported model folders (name -> folder), rows with their rate, kept width, path and
    checkpoint sizes."""
    from skeleton.folder import SkeletonFolder

    models, meta = {}, {}
    for name, path in folders.items():
        folder = SkeletonFolder(path)
        models[name], _, neurons = folder.load()
        meta[name] = {"rate": neurons.get("rate"), "head_rate": neurons.get("head_rate"),
                      "kept_width": neurons.get("kept_width"), "path": str(path), **folder.sizes()}
    result = benchmark(models, config, reference, baselines)
    result["rows"] = [{"model": r["model"], **meta[r["model"]], **r} for r in result["rows"]]
    return result


def at(result: dict, batch_size: int, text_tokens: int, execution: str = "eager") -> dict[str, dict]:
    """model -> row of one configuration (and execution) of a benchmark result."""
    rows = {r["model"]: r for r in result["rows"] if (r["batch_size"], r["text_tokens"]) == (batch_size, text_tokens)
            and r.get("execution", "eager") == execution}
    if not rows:
        raise KeyError(f"no rows at batch {batch_size}, {text_tokens} text tokens in this benchmark")
    return rows


# ---------------------------------------------------------------- reports

# (key, header, format) of the Markdown table; the CSV holds every field of every row.
TABLE = [("model", "model", "{}"), ("execution", "execution", "{}"), ("rate", "rate", "{:.2f}"),
         ("head_rate", "head rate", "{:.2f}"),
         ("latency_ms", "latency ms", "{:.1f}"), ("latency_p10_ms", "p10", "{:.1f}"),
         ("latency_p90_ms", "p90", "{:.1f}"), ("cpu_ms", "CPU ms", "{:.0f}"), ("throughput", "examples/s", "{:.1f}"),
         ("speedup", "speed-up", "{:.3f}"), ("speedup_p10", "p10", "{:.3f}"), ("speedup_p90", "p90", "{:.3f}"),
         ("cpu_speedup", "by CPU", "{:.3f}"), ("speedup_bound", "bound", "{:.3f}"),
         ("bound_ratio", "of bound", "{:.2f}"), ("execution_speedup", "vs eager", "{:.2f}"),
         ("prepare_s", "prepare s", "{:.1f}"), ("gmacs", "GMACs", "{:.2f}"),
         ("parameters", "parameters", "{:,}"), ("backbone_mb", "backbone MB", "{:.1f}"),
         ("total_mb", "folder MB", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.1f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if key.startswith("latency") and value < 10:  # a GPU's fractions of a millisecond: three significant digits
        return f"{value:.3g}"
    return fmt.format(value)


def _side_by_side(group: list[dict], executions: list[str]) -> list[str]:
    """One line per model: the bound, then per execution its latency and speed-up (and, past eager, its gain over
    the same model run eagerly)."""
    header = ["model", "bound"]
    for mode in executions:
        header += [f"{mode} ms", f"{mode} speed-up"] + ([f"{mode} / eager"] if mode != "eager" else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by = {(r["model"], r["execution"]): r for r in group}
    for model in dict.fromkeys(r["model"] for r in group):
        first = by[model, executions[0]]
        cells = [model, f"{first['speedup_bound']:.3f}"]
        for mode in executions:
            r = by[model, mode]
            cells += [_cell(r, "latency_ms", "{:.1f}"), f"{r['speedup']:.3f}"]
            if mode != "eager":
                cells.append(_cell(r, "execution_speedup", "{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict, title: str = "Latency: full model vs skeletons") -> str:
    env, rows = result["environment"], result["rows"]
    executions = list(dict.fromkeys(r.get("execution", "eager") for r in rows))
    columns = [c for c in TABLE if any(r.get(c[0]) is not None for r in rows)
               and (c[0] != "execution" or len(executions) > 1)]
    lines = [f"# {title}", "",
             f"{env['device']} ({env['device_name']}), {env['dtype']}, torch {env['torch']} with {env['threads']} "
             f"threads, transformers {env['transformers']}, attention {'/'.join(env['attention'])}; started "
             f"{env['started']}, load average {env['load_before']} before, {env['load_after']} after.", "",
             f"Per configuration: {env['warmup'] + 1} warm-up passes per model, then up to {env['repeats']} "
             "interleaved rounds (every model once per round, order rotated). Latency: median and p10/p90 of the "
             "passes. Speed-up: median and p10/p90 of the per-round ratios, reference time over model time. Bound: "
             "the reference's multiply-adds over the model's, the speed-up if time followed matrix work; 'of bound' "
             "= speed-up / bound. CPU ms: this process's CPU time per pass (well under threads x latency: the pass "
             "waited for cores); 'by CPU': the speed-up by CPU time (with 1 thread, robust to other programs). "
             "Peak MB: memory a forward pass allocates above what it starts with."]
    if len(executions) > 1:
        lines += ["", f"Executions: {', '.join(executions)} (skeleton/execution.py), every model in each, in the "
                      "same rounds. A speed-up is against the reference in the same execution; 'vs eager' / "
                      "'<execution> / eager' is the same model's eager time over its time in that execution. "
                      "'prepare s': the capture or compilation, before the warm-up. Peak MB: eager passes only."]
    if env.get("cpu_share", 1) < BUSY:
        lines += ["", f"**Busy machine**: the passes got {env['cpu_share']:.0%} of the CPU time their {env['threads']} "
                      "threads could use (other programs held the cores). Latencies are inflated and noisy; speed-ups, "
                      "measured interleaved, less so: read them with their p10-p90, or rerun with --threads 1 and "
                      "read 'by CPU'."]
    for b, n in sorted({(r["batch_size"], r["text_tokens"]) for r in rows}):
        group = [r for r in rows if (r["batch_size"], r["text_tokens"]) == (b, n)]
        prompt = group[0]["seq_len"] - n
        share = [r["cpu_ms"] / (env["threads"] * r["latency_ms"]) for r in group if r.get("cpu_ms") is not None]
        busy = f"; busy: {min(share):.0%} CPU time per thread" if share and min(share) < BUSY else ""
        lines += ["", f"## batch {b}, {n} text tokens + {prompt} prompt = {group[0]['seq_len']} positions "
                      f"({group[0]['repeats']} rounds{busy})", ""]
        if len(executions) > 1:
            lines += _side_by_side(group, executions) + [""]
        lines += ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in group]
    paths = {r["model"]: r["path"] for r in rows if r.get("path") and r["path"] != r["model"]}
    if paths:
        lines += ["", "Models:", ""] + [f"- {name}: `{path}`" for name, path in paths.items()]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: str | Path, title: str = "Latency: full model vs skeletons") -> dict[str, Path]:
    """benchmark.md (readable), benchmark.csv (a row per model and configuration) and benchmark.json (all)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "benchmark.md", "csv": out / "benchmark.csv", "json": out / "benchmark.json"}
    paths["markdown"].write_text(markdown(result, title))
    fields = list(dict.fromkeys(k for r in result["rows"] for k in r))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(result["rows"])
    paths["json"].write_text(json.dumps(result, indent=1))
    return paths
