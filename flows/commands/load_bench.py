"""The served speed-up: `skeleton serve` under load on loopback, the skeleton server against the full model's (the
same serving code, the full model as its one expert), in one run.

    skeleton load-bench --experts a=DIR b=DIR c=DIR d=DIR --alone DIR --full DIR --task rotten_tomatoes
    skeleton load-bench                       # synthetic MiniLM experts (random neurons) at p=0.5 0.65 0.8 0.9
    skeleton load-bench ... --clients 1 4 16 64 --seconds 12 --max-requests 5000 --out DIR --mlflow-run RUN_ID
    skeleton load-bench --sweep latest --rate 0.8   # a sweep's skeletons; the figures go to its MLflow run

Setups, each a `skeleton serve` process of its own: every expert in one server (requests round-robin over the
tasks), the --alone expert by itself, and the --full model by itself. All are started; the ones not under load are
paused (SIGSTOP: no CPU). For each round and number of concurrent clients the setups take turns (the order rotated
each round), every client sending one text per request (texts of the task's test split, in turn) until --seconds
pass or --max-requests are answered. Reported per setup and client count, medians over --rounds: answered requests
per second, p50 / p99 latency, the requests per batch the server ran, and the resident memory of the server's
processes; then the served speed-up (alone over full, same round and client count: median and range over the
rounds) beside the harness speed-up
(skeleton.benchmark, one process, no HTTP) at the batch sizes the server ran. Everything listens on 127.0.0.1.
Clients are asyncio tasks on aiohttp keep-alive connections, in this process. --out writes load.json, load.md and
load.png (throughput and served speed-up against clients); --mlflow-run logs the figures and those files to that
run. --sweep (a run id, or `latest`: the latest finished sweep) takes the experts from a sweep, its first seed's
--method skeletons (one per rate, the one at --rate alone, their full model) and its task's texts, and logs to the
sweep's parent run: the served figures beside the sweep's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SYNTHETIC_RATES = (0.5, 0.65, 0.8, 0.9)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`skeleton serve` of some experts on a free loopback port, in a session of its own (stopped as a group)."""

    def __init__(self, experts: list[str], folder: Path, options: list[str] = ()):
        self.port, self.stats = free_port(), folder / f"stats-{time.monotonic_ns()}.json"
        self.log = open(folder / f"serve-{self.port}.log", "w")
        argv = [sys.executable, "-m", "flows.cli", "serve", *experts, "--port", str(self.port),
                "--stats", str(self.stats), *options]
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/invocations"

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`skeleton serve` exited ({self.process.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"`skeleton serve` not healthy after {timeout} s; see {self.log.name}")

    def batches(self) -> dict[int, int]:
        """Requests per batch -> batches run so far."""
        try:
            return {int(k): v for k, v in json.loads(self.stats.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def rss_mib(self) -> float:
        """Resident memory of the server and every process it started (API server, workers, logger)."""
        import psutil

        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


async def _load(bodies: list[bytes], url: str, clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` concurrent clients, each posting the next body in turn until time or count runs out."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(session, k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
            start = time.perf_counter()
            async with session.post(url, data=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"}) as answer:
                await answer.read()
                if answer.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
            i += clients

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session, k) for k in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {"clients": clients, "requests": len(latencies), "errors": errors, "throughput": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def load(bodies: list[bytes], url: str, clients: int, seconds: float, max_requests: int) -> dict:
    return asyncio.run(_load(bodies, url, clients, seconds, max_requests))


def bodies_for(tasks: list[str], texts: list[str]) -> list[bytes]:
    """One text per request, the tasks in turn."""
    return [json.dumps({"dataframe_split": {"columns": ["task", "text"], "data": [[tasks[i % len(tasks)], text]]}})
            .encode() for i, text in enumerate(texts)]


def measure(setups: dict[str, tuple[list[str], list[str]]], texts: list[str], args, folder: Path) -> list[dict]:
    """Every setup's server up at once, all paused (SIGSTOP: no CPU) but the one under load; per round and client
    count the setups take turns, the order rotated each round, so a machine that slows down or speeds up during the
    run hits them alike. Returns a row per round, setup and client count."""
    servers = {name: Server(specs, folder, args.serve_options) for name, (specs, _) in setups.items()}
    bodies = {name: bodies_for(tasks, texts) for name, (_, tasks) in setups.items()}
    rows = []
    try:
        for name, server in servers.items():
            server.wait()
            load(bodies[name], server.url, 4, 2.0, 64)  # warm-up: first batches of each size allocate
            server.pause()
        names = list(servers)
        for round_ in range(args.rounds):
            for clients in args.clients:
                for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                    server = servers[name]
                    server.resume()
                    before = server.batches()
                    row = {"setup": name, "round": round_, **load(bodies[name], server.url, clients, args.seconds,
                                                                   args.max_requests)}
                    time.sleep(0.2)  # the logger process writes the last batches
                    after = server.batches()
                    ran = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
                    row["mean_batch"] = sum(k * n for k, n in ran.items()) / max(1, sum(ran.values()))
                    row["rss_mib"] = server.rss_mib()
                    server.pause()
                    rows.append(row)
                    print(f"round {round_} {name:30s} {clients:3d} clients: {row['throughput']:7.1f} req/s  p50 "
                          f"{row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch']:5.1f}  "
                          f"RSS {row['rss_mib']:6.0f} MiB  ({row['requests']} answered, {row['errors']} errors)",
                          flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per setup and client count: the median over rounds of each figure."""
    out = {}
    for row in rows:
        out.setdefault((row["setup"], row["clients"]), []).append(row)
    return [{"setup": setup, "clients": clients, "rounds": len(group),
             **{key: statistics.median(r[key] for r in group)
                for key in ("throughput", "p50_ms", "p99_ms", "mean_batch", "rss_mib", "requests", "errors")}}
            for (setup, clients), group in out.items()]


def task_texts(task: str, limit: int = 2000) -> list[str]:
    """The test split of a registered task (the sweep's split, seed 0)."""
    from skeleton.data import load_task

    return list(load_task(task, seed=0)["test"]["text"])[:limit]


def token_length(texts: list[str], folder: str, max_length: int) -> int:
    """Mean tokens per text as the served expert sees them (truncated to its max_length)."""
    from transformers import AutoTokenizer

    from skeleton.folder import SkeletonFolder

    tokenizer = AutoTokenizer.from_pretrained(SkeletonFolder(folder).backbone)
    lengths = [min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"]]
    return round(sum(lengths) / len(lengths))


def harness(full: str, alone: str, batch_sizes: list[int], length: int, repeats: int) -> dict[int, float]:
    """Batch size -> the harness speed-up of `alone` over `full` (fresh process, no HTTP)."""
    code = ("import json, sys\nfrom skeleton.benchmark import BenchmarkConfig, benchmark_folders\n"
            "a = json.loads(sys.argv[1])\n"
            "r = benchmark_folders({'full': a['full'], 'alone': a['alone']}, BenchmarkConfig(batch_sizes=a['b'], "
            "lengths=(a['n'],), repeats=a['r'], memory=False), reference='full')\n"
            "print(json.dumps({row['batch_size']: row['speedup'] for row in r['rows'] if row['model'] == 'alone'}))\n")
    args = json.dumps({"full": full, "alone": alone, "b": batch_sizes, "n": length, "r": repeats})
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"harness benchmark failed: {done.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def from_sweep(args) -> None:
    """Set --experts, --alone, --full, --mlflow-run (and --task, unless given) from the sweep --sweep names."""
    from skeleton.folder import SkeletonFolder
    from tasks import nightly

    records, run_id = nightly.sweep_records(args.experiment, None if args.sweep == "latest" else args.sweep)
    full, points = nightly.first_seed(records, args.method)
    alone = next((p for p in points if p.rate == args.rate), None)
    if alone is None:
        raise SystemExit(f"load-bench: sweep {run_id} has no {args.method} skeleton at --rate {args.rate:g}; its "
                         f"rates: {', '.join(f'{p.rate:g}' for p in points)}")
    args.experts, args.alone, args.full, args.mlflow_run = ([f"p{p.rate:g}={p.path}" for p in points], alone.path,
                                                           full.path, run_id)
    args.task = args.task or SkeletonFolder(full.path).record()["task"]
    if args.task.startswith("file:"):
        raise SystemExit(f"load-bench: sweep {run_id} ran on a user file ({args.task}); give --task with a "
                         "registered task whose test texts the clients send")


def synthetic(folder: Path) -> tuple[dict[str, str], str, str]:
    """4 MiniLM experts with random neurons at SYNTHETIC_RATES and a full model, random prompts and heads."""
    from flows.commands.serve_bench import synthetic_experts

    folders = synthetic_experts("minilm", [*SYNTHETIC_RATES, 0.0], len(SYNTHETIC_RATES) + 1, 64, folder)
    experts = {f"p{rate}": str(f) for rate, f in zip(SYNTHETIC_RATES, folders)}
    return experts, experts["p0.8"], str(folders[-1])


def report(models: dict, rows: list[dict], speedups: list[dict]) -> str:
    # the folders measured first, so a report read later (or on the MLflow run) says what it compares
    lines = [f"- {name}: {v if isinstance(v, str) else ', '.join(f'{t}={f}' for t, f in v.items())}"
             for name, v in models.items()]
    lines += ["", "| setup | clients | req/s | p50 ms | p99 ms | requests per batch | RSS MiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['clients']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['mean_batch']:.1f} | {r['rss_mib']:.0f} |" for r in rows]
    lines += ["", "| clients | served speed-up (alone / full req/s; median, range over rounds) | requests per batch (alone, full) | "
                  "harness speed-up at that batch |", "|---|---|---|---|"]
    lines += [f"| {s['clients']} | {s['served_speedup']:.2f}x ({s['served_speedup_range'][0]:.2f}-"
              f"{s['served_speedup_range'][1]:.2f}) | {s['batch_alone']:.1f}, {s['batch_full']:.1f} | "
              f"{s['harness_speedup']:.2f}x (batch {s['harness_batch']}) |" for s in speedups]
    return "\n".join(lines)


def plot(rows: list[dict], speedups: list[dict], out: Path) -> Path:
    """Throughput against clients per setup; the served speed-up against clients beside the harness speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for setup in dict.fromkeys(r["setup"] for r in rows):
        mine = [r for r in rows if r["setup"] == setup]
        left.plot([r["clients"] for r in mine], [r["throughput"] for r in mine], marker="o", label=setup)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="answered requests / s", title="Throughput")
    left.legend(fontsize=8)
    clients = [s["clients"] for s in speedups]
    right.plot(clients, [s["served_speedup"] for s in speedups], marker="o", label="served (alone / full req/s)")
    right.plot(clients, [s["harness_speedup"] for s in speedups], marker="s", linestyle="--",
               label="harness, at the batch the server ran")
    right.axhline(1.0, color="grey", linestyle=":")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="speed-up over the full model",
              title="Served speed-up")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def log_to_mlflow(run_id: str, rows: list[dict], speedups: list[dict], folder: Path) -> None:
    """Metrics served_<setup>_<what>_c<clients> and served_speedup_c<clients> on the run, the files as artifacts."""
    import re

    import mlflow

    from tasks.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    metrics = {f"served_{re.sub('[^a-z0-9]+', '_', r['setup'].lower()).strip('_')}_{key}_c{r['clients']}": r[key]
               for r in rows for key in ("throughput", "p50_ms", "p99_ms", "mean_batch", "rss_mib")}
    metrics |= {f"served_speedup_c{s['clients']}": s["served_speedup"] for s in speedups}
    metrics |= {f"harness_speedup_c{s['clients']}": s["harness_speedup"] for s in speedups}
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.log_artifacts(run_id, str(folder), "serving")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--experts", nargs="+", metavar="TASK=DIR", help="the experts of the multi-task server")
    parser.add_argument("--alone", metavar="DIR", help="the expert measured by itself against --full")
    parser.add_argument("--full", metavar="DIR", help="the full model (a rate-0 skeleton folder)")
    parser.add_argument("--task", help="registered task whose test texts the clients send (default: the --sweep's "
                        "task, else rotten_tomatoes)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=12.0, help="per setup and client count")
    parser.add_argument("--max-requests", type=int, default=5000, help="per setup and client count")
    parser.add_argument("--rounds", type=int, default=2, help="times every setup meets every client count "
                        "(figures: medians over rounds)")
    parser.add_argument("--harness-repeats", type=int, default=20, help="timed rounds of the harness comparison")
    parser.add_argument("--serve-options", nargs=argparse.REMAINDER, default=[],
                        help="the rest is passed to every `skeleton serve` (e.g. --max-batch-size 64 --workers 2)")
    parser.add_argument("--out", type=Path, help="folder for load.json, load.md and load.png")
    parser.add_argument("--mlflow-run", metavar="RUN_ID", help="log the figures to this MLflow run")
    parser.add_argument("--sweep", metavar="RUN_ID|latest", help="a sweep's skeletons as the experts, its full "
                        "model as --full, figures logged to its MLflow run")
    parser.add_argument("--rate", type=float, default=0.8, help="with --sweep: the rate of the expert measured alone")
    parser.add_argument("--method", default="grad_x_act", help="with --sweep: the selection method of the experts")
    parser.add_argument("--experiment", default="skeleton", help="with --sweep: the MLflow experiment of the sweeps")
    args = parser.parse_args(argv)
    if args.sweep and (args.experts or args.alone or args.full or args.mlflow_run):
        raise SystemExit("load-bench: --sweep names the experts, the full model and the MLflow run itself: drop "
                         "--experts, --alone, --full and --mlflow-run")
    if bool(args.experts) != bool(args.alone) or bool(args.alone) != bool(args.full):
        raise SystemExit("load-bench: give --experts, --alone and --full together, or none for synthetic experts")
    if min(args.clients) < 1 or args.seconds <= 0 or args.max_requests < 1 or args.rounds < 1:
        raise SystemExit("load-bench: --clients, --max-requests and --rounds must be positive, --seconds above 0")

    from skeleton.folder import SkeletonFolder

    if args.sweep:
        from_sweep(args)
    args.task = args.task or "rotten_tomatoes"
    texts = task_texts(args.task)
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        tmp = Path(tmp)
        if args.experts:
            experts = dict(e.split("=", 1) for e in args.experts)
            alone, full = args.alone, args.full
            models = {"experts": experts, "alone": alone, "full": full}
        else:
            experts, alone, full = synthetic(tmp / "experts")
            alone_name = next(t for t, f in experts.items() if f == alone)
            models = {"synthetic": f"MiniLM experts with random neurons {', '.join(experts)}, alone {alone_name}"}
        setups = {f"skeleton server, {len(experts)} experts": ([f"{t}={f}" for t, f in experts.items()], list(experts)),
                  "skeleton alone": ([f"alone={alone}"], ["alone"]), "full model": ([f"full={full}"], ["full"])}
        runs = measure(setups, texts, args, tmp)
        rows = medians(runs)
        by = {(r["setup"], r["clients"]): r for r in rows}
        max_length = SkeletonFolder(alone).record().get("max_length") or 64
        length = token_length(texts, alone, max_length)
        sizes = {c: max(1, round(by["skeleton alone", c]["mean_batch"])) for c in args.clients}
        measured = harness(full, alone, sorted(set(sizes.values())), length, args.harness_repeats)
    ratios = {c: [a["throughput"] / f["throughput"] for a in runs for f in runs if a["clients"] == f["clients"] == c
                  and a["round"] == f["round"] and (a["setup"], f["setup"]) == ("skeleton alone", "full model")]
              for c in args.clients}
    speedups = [{"clients": c, "served_speedup": statistics.median(ratios[c]), "served_speedup_range": [
                     min(ratios[c]), max(ratios[c])],
                 "batch_alone": by["skeleton alone", c]["mean_batch"], "batch_full": by["full model", c]["mean_batch"],
                 "harness_batch": sizes[c], "harness_speedup": measured[sizes[c]]} for c in args.clients]
    table = report(models, rows, speedups)
    print(f"\ntexts: {args.task} test split, {length} tokens on average; {os.cpu_count()} CPUs\n\n{table}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="load-bench-")) if args.mlflow_run else None)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        environment = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "seconds": args.seconds,
                       "max_requests": args.max_requests, "rounds": args.rounds, "task": args.task, "text_tokens": length,
                       "serve_options": args.serve_options, "models": models}
        (out / "load.json").write_text(json.dumps({"environment": environment, "rows": rows, "runs": runs,
                                                   "speedups": speedups}, indent=1))
        (out / "load.md").write_text(table + "\n")
        plot(rows, speedups, out / "load.png")
        print(f"report: {out}")
    if args.mlflow_run:
        log_to_mlflow(args.mlflow_run, rows, speedups, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
