"""Measure unplug-and-play serving: one backbone + N task experts in one process versus N separate skeletons.

    skeleton serve-bench                          # 4 synthetic experts of MiniLM (random neurons/adapters)
    skeleton serve-bench --skeletons artifacts/skeletons --backbone minilm   # real exported skeletons

Synthetic experts: the real backbone, seeded random prompts and heads (2, 3, 4, 8 labels), random kept neurons at
--rates, exported with skeleton.prune. Reported: bytes of parameters and buffers held (and the process RSS
growth, each setup measured in a fresh subprocess), switch time (plug in + restore, median), and per-task latency
at one batch (interleaved round-robin, medians): the exported skeleton loaded standalone, the server (plug,
forward, restore), the forward alone while plugged, and the full backbone with the same adapter.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from skeleton.backbones import family_of, load_backbone
from skeleton.folder import export_skeleton, load_skeleton, read_meta
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.prune import slice_ffn
from skeleton.selection import select
from skeleton.serve import SkeletonServer, find_skeletons, held_bytes

LABELS = (2, 3, 4, 8)
WORDS = "the film was a gripping and beautifully made story though its second half drags on without charm".split()


def synthetic_experts(backbone_name: str, rates: list[float], n: int, max_length: int, folder: Path) -> list[Path]:
    out = []
    for i in range(n):
        backbone, tokenizer = load_backbone(backbone_name)
        rate, labels = rates[i % len(rates)], LABELS[i % len(LABELS)]
        model = PromptClassifier(backbone, AdapterConfig(labels, 20, [f"label{j}" for j in range(labels)]), seed=i)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            model.head.weight.normal_(0, 0.5, generator=g)
        keep = select([torch.rand(b.down.in_features, generator=g) for b in family_of(backbone).ffn_blocks(backbone)],
                      rate)
        slice_ffn(backbone, keep)
        meta = {"rate": rate, "task": f"synthetic{i}", "method": "random", "backbone": backbone_name,
                "max_length": max_length}
        out.append(export_skeleton(model, tokenizer, keep, folder / f"expert{i}", meta))
    return out


def rss_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0])
    return fields


@torch.no_grad()
def rss_child(mode: str, backbone: str, folders: list[str]) -> None:
    """Run in a fresh process: print the RSS growth (KiB) of loading one setup and running it once."""
    from transformers import AutoModel, AutoTokenizer  # noqa: F401  (import costs belong to the baseline)

    torch.set_num_threads(1)
    gc.collect()
    before = rss_kib()
    ids = torch.full((2, 16), 2000)
    # A forward per expert, and every tensor read once: checkpoints are memory-mapped, and pages not yet touched
    # (most rows of the embedding matrix) are not resident; a long-running server touches them all eventually.
    if mode == "server":
        server = SkeletonServer.load(backbone)
        for name in [server.add(folder) for folder in folders]:
            with server.plugged(name) as model:
                model(ids, torch.ones_like(ids))
        held = [server.backbone, *(e.model for e in map(server.experts.__getitem__, server.names))]
    else:
        held = [load_skeleton(folder)[0] for folder in folders]
        for model in held:
            model(ids, torch.ones_like(ids))
    for model in held:
        sum(float(t.sum()) for t in [*model.parameters(), *model.buffers()])
    gc.collect()
    after = rss_kib()
    print(json.dumps({k: after[k] - before[k] for k in after}), flush=True)
    del held


def measure_rss(mode: str, backbone: str, folders: list[Path]) -> dict[str, int] | None:
    argv = [sys.executable, "-m", "flows.commands.serve_bench", "--rss-child", mode, "--backbone", backbone,
            "--skeletons", *map(str, folders)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(f"RSS measurement ({mode}) failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


@torch.no_grad()
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=None, help="registered name or folder (default: recorded, else minilm)")
    parser.add_argument("--skeletons", nargs="+", help="exported skeletons (folders, or folders of them) to use")
    parser.add_argument("--experts", type=int, default=4, help="number of synthetic experts")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.65, 0.8, 0.9])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per text (the texts are truncated to it)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--rss-child", choices=["server", "standalone"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.backbone, args.skeletons)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.skeletons:
            folders = find_skeletons(args.skeletons)
            recorded = read_meta(folders[0]).get("backbone")
            backbone = args.backbone or recorded or "minilm"
        else:
            backbone = args.backbone or "minilm"
            start = time.perf_counter()
            folders = synthetic_experts(backbone, args.rates, args.experts, args.seq_len, Path(tmp))
            print(f"exported {len(folders)} synthetic experts in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        server = SkeletonServer.load(backbone, device=device)
        load_s = time.perf_counter() - start
        add_s, names = [], []
        for folder in folders:
            start = time.perf_counter()
            names.append(server.add(folder))
            add_s.append(time.perf_counter() - start)
        # The same backbone object, served a second way: each expert's sliced weights kept, a switch swaps pointers.
        cached = SkeletonServer(server.backbone, server.tokenizer, backbone, cache_slices=True)
        for folder, name in zip(folders, names):
            cached.add(folder, name=name)
        standalone = {name: load_skeleton(folder)[0].to(device).eval() for name, folder in zip(names, folders)}
        print(f"backbone {backbone}: loaded in {load_s:.2f} s; adding an expert (verify, check, adapter) took "
              f"{statistics.median(add_s):.2f} s median")

        # Memory: bytes of parameters and buffers held.
        lean, fat = server.memory(), cached.memory()
        served = lean["backbone"] + sum(lean[n] for n in names)
        served_cached = fat["backbone"] + sum(fat[n] for n in names)
        separate = sum(held_bytes(m) for m in standalone.values())
        mib = 2**20
        print(f"\nmemory, parameters + buffers held, {len(names)} experts:")
        print(f"  one backbone {lean['backbone'] / mib:.1f} MiB + experts {(served - lean['backbone']) / mib:.3f} MiB "
              f"= {served / mib:.1f} MiB (slicing on plug)")
        print(f"  one backbone + experts with cached slices = {served_cached / mib:.1f} MiB")
        print(f"  {len(names)} separate skeletons = {separate / mib:.1f} MiB  "
              f"(x{separate / served:.2f} of the server)")
        if not args.no_rss and device.type == "cpu":
            rss = {mode: measure_rss(mode, backbone, folders) for mode in ("server", "standalone")}
            if all(rss.values()):
                print("  process RSS growth (fresh process each): server " + ", ".join(
                    f"{k} {v / 1024:.1f} MiB" for k, v in rss["server"].items()) + "; separate " + ", ".join(
                    f"{k} {v / 1024:.1f} MiB" for k, v in rss["standalone"].items()))

        # Inputs: batch_size texts long enough to be truncated to seq_len tokens.
        text = " ".join(WORDS * (args.seq_len // len(WORDS) + 2))
        texts = [f"{i} {text}" for i in range(args.batch_size)]
        inputs = {name: server.encode(name, texts) for name in names}

        def served_call(name):
            with server.plugged(name) as model:
                model(*inputs[name])

        def plugged_forward(name):
            with server.plugged(name) as model:
                return timed(lambda: model(*inputs[name]), device)

        # Exactness on the benchmark batch: the server's logits against the standalone skeleton's.
        diffs = {name: (server.logits(name, texts, args.batch_size) - standalone[name](*inputs[name]).cpu())
                 .abs().max().item() for name in names}
        times = {key: {n: [] for n in names} for key in ("switch", "switch_cached", "standalone", "server",
                                                          "plugged", "full")}
        for name in names:  # warm-up
            standalone[name](*inputs[name])
            served_call(name)
            server.experts[name].model(*inputs[name])
        for _ in range(args.repeats):
            for name in names:
                times["switch"][name].append(timed(lambda: _switch(server, name), device))
                times["switch_cached"][name].append(timed(lambda: _switch(cached, name), device))
                times["standalone"][name].append(timed(lambda: standalone[name](*inputs[name]), device))
                times["server"][name].append(timed(lambda: served_call(name), device))
                times["plugged"][name].append(plugged_forward(name))
                times["full"][name].append(timed(lambda: server.experts[name].model(*inputs[name]), device))

    shape = tuple(next(iter(inputs.values()))[0].shape)
    print(f"\nlatency, batch {shape[0]} x {shape[1]} tokens (+ prompt), medians of {args.repeats} interleaved "
          f"repeats, {torch.get_num_threads()} threads, device {device}; times in ms")
    header = ("expert", "rate", "width", "labels", "switch", "switch(cached)", "standalone", "server", "plugged fwd",
              "full", "server/standalone", "max|logit diff|")
    rows = []
    for name in names:
        e = server.experts[name]
        widths = sorted({len(k) for k in e.keep})
        t = {key: median_ms(times[key][name]) for key in times}
        rows.append((name, f"{e.meta.get('rate', 0.0):g}", "-".join(map(str, widths)), str(len(e.labels)),
                     f"{t['switch']:.2f}", f"{t['switch_cached']:.3f}", f"{t['standalone']:.1f}", f"{t['server']:.1f}",
                     f"{t['plugged']:.1f}", f"{t['full']:.1f}", f"{t['server'] / t['standalone']:.3f}",
                     f"{diffs[name]:.1e}"))
    sizes = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(size) if i else cell.ljust(size) for i, (cell, size) in enumerate(zip(row, sizes))))
    return 0


def _switch(server: SkeletonServer, name: str) -> None:
    """One plug in + restore, no forward."""
    with server.plugged(name):
        pass


if __name__ == "__main__":
    sys.exit(main())
