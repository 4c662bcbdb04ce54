"""Memory of unplug-and-play serving: one backbone + N task experts in one process versus N separate skeletons.

    skeleton serve-bench                          # 4 synthetic experts of MiniLM (random neurons/adapters)
    skeleton serve-bench --skeletons artifacts/skeletons --backbone minilm   # real exported skeletons

Synthetic experts: the real backbone, seeded random prompts and heads (2, 3, 4, 8 labels), random kept neurons at
--rates, exported with skeleton.prune. Reported: bytes of parameters and buffers held, per expert and for all
(an expert holds its FFN slices, prompt and head; everything else is the backbone's own tensors), the process RSS
growth of each setup in a fresh subprocess, the time to add an expert, and that every expert answers as its
exported folder does. Throughput and latency under load: `skeleton load-bench`.
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
from skeleton.folder import SkeletonFolder
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.prune import slice_ffn
from skeleton.selection import select
from skeleton.serve import SkeletonServer, held_bytes

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
        out.append(SkeletonFolder.export(model, tokenizer, keep, folder / f"expert{i}", meta).path)
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
            server.experts[name].model(ids, torch.ones_like(ids))
        held = [server.backbone, *(e.model for e in map(server.experts.__getitem__, server.names))]
    else:
        held = [SkeletonFolder(folder).load()[0] for folder in folders]
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


@torch.no_grad()
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=None, help="registered name or folder (default: recorded, else minilm)")
    parser.add_argument("--skeletons", nargs="+", help="exported skeletons (folders, or folders of them) to use")
    parser.add_argument("--experts", type=int, default=4, help="number of synthetic experts")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.65, 0.8, 0.9])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per text (the texts are truncated to it)")
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
            folders = [folder.path for folder in SkeletonFolder.find(args.skeletons)]
            recorded = SkeletonFolder(folders[0]).meta().get("backbone")
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
        standalone = {name: SkeletonFolder(folder).load()[0].to(device).eval() for name, folder in zip(names, folders)}
        print(f"backbone {backbone}: loaded in {load_s:.2f} s; adding an expert (verify, check, build) took "
              f"{statistics.median(add_s):.2f} s median")

        # Memory: bytes of parameters and buffers held.
        memory = server.memory()
        served = memory["backbone"] + sum(memory[n] for n in names)
        separate = sum(held_bytes(m) for m in standalone.values())
        mib = 2**20
        print(f"\nmemory, parameters + buffers held, {len(names)} experts:")
        for name in names:
            print(f"  {name}: {memory[name] / mib:.2f} MiB of its own (FFN slices, prompt, head)")
        print(f"  one backbone {memory['backbone'] / mib:.1f} MiB + experts {(served - memory['backbone']) / mib:.2f} "
              f"MiB = {served / mib:.1f} MiB")
        print(f"  {len(names)} separate skeletons = {separate / mib:.1f} MiB  (x{separate / served:.2f} of the server)")
        if not args.no_rss and device.type == "cpu":
            rss = {mode: measure_rss(mode, backbone, folders) for mode in ("server", "standalone")}
            if all(rss.values()):
                print("  process RSS growth (fresh process each): server " + ", ".join(
                    f"{k} {v / 1024:.1f} MiB" for k, v in rss["server"].items()) + "; separate " + ", ".join(
                    f"{k} {v / 1024:.1f} MiB" for k, v in rss["standalone"].items()))

        # Exactness on one batch: every expert's logits against its exported skeleton's.
        text = " ".join(WORDS * (args.seq_len // len(WORDS) + 2))
        texts = [f"{i} {text}" for i in range(args.batch_size)]
        for name in names:
            with torch.no_grad():
                alone = standalone[name](*server.encode(name, texts)).cpu()
            diff = (server.logits(name, texts, args.batch_size) - alone).abs().max().item()
            print(f"  {name}: max |logit difference| against its exported folder {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
