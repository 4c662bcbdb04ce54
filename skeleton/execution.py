"""Inference of an eval-mode PromptClassifier without the launch overhead of eager PyTorch: the model as it is,
CUDA-graph replay over padded shape buckets, or torch.compile.

    runner = Runner(model, "graph", batch_buckets=(1, 2, 4, 8, 16, 32, 64), length_buckets=(16, 32, 64, 128))
    logits = runner(input_ids, attention_mask)  # (batch, seq) right-padded -> (batch, num_labels), on the model's device
    runner.prepare()                            # capture (compile) every bucket now; else each on its first use

Modes (MODES):
  "eager"    the model called as it is, on the batch as it comes: what every stage runs;
  "graph"    CUDA only. Per bucket (a batch size and a sequence length), static input tensors and one
             torch.cuda.CUDAGraph captured over them: a call copies its batch into the smallest bucket that holds it,
             replays, and returns a copy of its rows. On a GPU an eager pass of a small model is mostly kernel launches
             (MiniLM: ~3.4 ms at batch 1, 32 or 256 on an H200); a replay launches them all at once;
  "compile"  torch.compile on the same padded buckets (one compiled graph per bucket; on CUDA in mode
             "reduce-overhead", inductor's kernels replayed as CUDA graphs). On this project's 2-core CPU it did not
             pay (docs/benchmark.md): use it where a measurement says so.
Padding: columns past a text are masked (attention mask 0) and rows past the batch attend to their first position
only and are dropped, so a padded pass computes the same logits; the matrices have other shapes, so the numbers
differ by rounding: float32 within 1e-5 of eager (tests/test_execution.py), bfloat16 within 2e-2 + 2e-2 * |logit|
(checked on a GPU by flows/commands/gpu_bench.py). A batch larger than the largest batch bucket is split; a
sequence longer than the largest length bucket runs eagerly (counted in `eager_fallbacks`).

What a graph reads is fixed at capture: the tensors the model read then, by address (its parameters: in-place
edits show through, parameters replaced after capture, by loading or `.to()`, do not: make a new runner), the
runner's static inputs, and memory of its pool. Runners can share one pool (`pool=`) when they never run at the
same time.

Threads: padded calls are served one at a time (one lock per runner: the static tensors are shared), from any
thread; unpadded eager calls run concurrently.

Serving many experts on one backbone (skeleton/serve.py): each expert is a network of its own that shares the
backbone's tensors, so each gets a runner of its own (`SkeletonServer(..., execution="graph")`); a replay reads the
tensors the expert holds, which never change after `add`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch
from torch import nn

MODES = ("eager", "graph", "compile")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_BUCKETS = (16, 32, 64, 128)
WARMUP = 3  # eager passes on a side stream before a capture (cuBLAS / attention kernels pick their algorithms)


def check_mode(mode: str, device: str | torch.device = "cpu") -> str:
    """`mode` if it can run on `device`; ValueError saying why not."""
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "graph" and torch.device(device).type != "cuda":
        raise ValueError(f"execution mode 'graph' replays CUDA graphs: it needs a CUDA device, not {str(device)!r} "
                         "(on a CPU: 'eager', or 'compile')")
    return mode


def bucket(size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `size`, or None when none does."""
    return next((b for b in buckets if b >= size), None)


class Runner:
    """Logits of `model` (an eval-mode PromptClassifier, or any module taking (input_ids, attention_mask)) in one of
    MODES; see the module doc. `compile_mode`: torch.compile's mode (default "reduce-overhead" on CUDA, "default"
    elsewhere). `pad` (default: on for "graph" and "compile", off for "eager") runs every call at a bucket's shape;
    `pad_id` fills padded positions (they are masked: any valid token id)."""

    def __init__(self, model: nn.Module, mode: str = "eager", batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 length_buckets: Sequence[int] = LENGTH_BUCKETS, *, pad: bool | None = None, pad_id: int = 0,
                 compile_mode: str | None = None, pool=None):
        if model.training:
            raise ValueError("a Runner runs a model in eval mode: call model.eval() first")
        self.model = model
        self.device = next(model.parameters()).device
        self.mode = check_mode(mode, self.device)
        self.batch_buckets = tuple(sorted({int(b) for b in batch_buckets}))
        self.length_buckets = tuple(sorted({int(n) for n in length_buckets}))
        if not self.batch_buckets or not self.length_buckets or min(self.batch_buckets + self.length_buckets) < 1:
            raise ValueError(f"buckets must be positive sizes, got batch {batch_buckets!r}, length {length_buckets!r}")
        self.pad = mode != "eager" if pad is None else pad
        if mode != "eager" and not self.pad:
            raise ValueError(f"mode {mode!r} runs fixed shapes: it pads every call to a bucket (pad=True)")
        self.pad_id = pad_id
        self.prepared: dict[tuple[int, int], float] = {}  # bucket -> seconds its capture / compilation took
        self.eager_fallbacks = 0  # calls (or chunks) longer than the largest length bucket, run eagerly
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # static (ids, mask) per bucket
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # a graph's static output, overwritten by each replay
        self._lock = threading.Lock()
        self._pool = None
        if mode == "graph":
            self._pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        if mode == "compile":
            self.compile_mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
            _allow_recompiles(len(self.batch_buckets) * len(self.length_buckets))
            self._compiled = torch.compile(model, mode=self.compile_mode, dynamic=False)

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def buckets(self) -> list[tuple[int, int]]:
        """Every (batch size, length) bucket, largest first (the order `prepare` captures them in)."""
        return sorted(((b, n) for b in self.batch_buckets for n in self.length_buckets), reverse=True)

    @torch.no_grad()
    def prepare(self, buckets: Sequence[tuple[int, int]] | None = None) -> dict[tuple[int, int], float]:
        """Capture (graph) or compile (compile) the given buckets now, default all, largest first (smaller graphs
        then reuse the larger ones' pool memory). Returns bucket -> seconds, of the buckets prepared so far."""
        with self._lock:
            for b, n in buckets or self.buckets():
                self._prepare(b, n)
            return dict(self.prepared)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids and attention_mask must both be (batch, seq), got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        if not self.pad:
            return self.model(input_ids.to(self.device), attention_mask.to(self.device))
        with self._lock:
            step = self.max_batch
            return torch.cat([self._padded(input_ids[i : i + step], attention_mask[i : i + step])
                              for i in range(0, max(len(input_ids), 1), step)])

    # ---- one chunk of at most max_batch rows

    def _padded(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length = ids.shape
        b, n = bucket(rows, self.batch_buckets), bucket(length, self.length_buckets)
        if n is None:  # longer than any bucket: not worth a graph of its own
            self.eager_fallbacks += 1
            return self.model(ids.to(self.device), mask.to(self.device))
        if (b, n) not in self.prepared:
            self._prepare(b, n)
        static = self._inputs[b, n]
        _fill(*static, ids, mask, self.pad_id)
        if self.mode == "graph":
            self._graphs[b, n].replay()
            return self._outputs[b, n][:rows].clone()
        if self.mode == "eager":  # padded: what the other modes compute, run eagerly
            return self.model(*static)[:rows]
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs may be overwritten now
        return self._compiled(*static)[:rows].clone()

    def _prepare(self, b: int, n: int) -> None:
        """Capture (graph) or compile (compile) bucket (b, n), over its static inputs; a no-op once done."""
        if (b, n) in self.prepared:
            return
        start = time.perf_counter()
        static = self._inputs[b, n] = _blank(b, n, self.device, self.pad_id)
        if self.mode == "graph":
            self._graphs[b, n], self._outputs[b, n] = self._capture(*static)
        elif self.mode == "compile":
            for _ in range(3):  # compiles on the first call; reduce-overhead records its CUDA graph by the third
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                self._compiled(*static)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prepared[b, n] = time.perf_counter() - start

    def _capture(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graph wants
            for _ in range(WARMUP):
                self.model(ids, mask)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a server's) may keep using the GPU while this one captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.model(ids, mask)
        return graph, out


def _blank(b: int, n: int, device: torch.device, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a bucket holding no text: every row attends to its first position only."""
    ids = torch.full((b, n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, n), dtype=torch.long, device=device)
    mask[:, 0] = 1
    return ids, mask


def _fill(static_ids: torch.Tensor, static_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
          pad_id: int) -> None:
    """Copy a (rows, length) batch into the top-left corner of a bucket's inputs and mask everything else: padded
    columns are masked out, padded rows attend to their first position only (a fully masked row would give NaN)."""
    if ids.shape == static_ids.shape:  # the bucket's own shape: two copies
        static_ids.copy_(ids)
        static_mask.copy_(mask)
        return
    rows, length = ids.shape
    static_ids.fill_(pad_id)
    static_ids[:rows, :length].copy_(ids)
    static_mask.zero_()
    static_mask[rows:, 0] = 1
    static_mask[:rows, :length].copy_(mask)


def _allow_recompiles(shapes: int) -> None:
    """dynamo compiles a forward once per input shape, and stops (falling back to eager, with a warning) past its
    recompile limit (8 per code object: all PromptClassifiers share one forward): raise it to fit the buckets."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), shapes + 64))
            break
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * (shapes + 64))
