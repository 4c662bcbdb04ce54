"""Load test of REST serving on loopback: `mlflow models serve` of the multi-task model (one backbone, 4 task
experts) against 4 separate skeleton servers (one process per task) and against one server of the full model.

    skeleton load-bench                                   # 4 synthetic MiniLM experts (as serve_bench.py)
    skeleton load-bench --experts a=DIR b=DIR c=DIR d=DIR --full DIR   # real skeletons and full model
    skeleton load-bench --clients 1 4 16 --seconds 10 --max-requests 2000 --out bench.json

For each setup and each number of concurrent clients, every client sends one text per request (tasks round-robin)
until --seconds pass or --max-requests are answered; reported: answered requests per second, p50 / p99 latency,
and the resident memory of the setup's server processes (all of their processes, after the load). Everything
listens on 127.0.0.1 only; servers are started and stopped by the script (one uvicorn worker each, and the
multi-task server once more with two).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

WORDS = "the film was a gripping and beautifully made story though its second half drags on without charm".split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow models serve` of a saved model folder, on a free loopback port, in its own session."""

    def __init__(self, model: Path, log: Path, workers: int = 1):
        self.port = free_port()
        self.log = open(log, "w")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(self.port), "-w", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/invocations"

    def wait(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server on port {self.port} exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"server on port {self.port} not up after {timeout} s")

    def rss_mib(self) -> float:
        """Resident memory of the server and every process it started (uvicorn worker)."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def load(targets: list[tuple[str, dict]], clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads, each sending the next target's request in turn until time or count runs out."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            with lock:
                if len(latencies) >= max_requests:
                    return
            url, body = targets[i % len(targets)]
            start = time.perf_counter()
            post(url, body)
            with lock:
                latencies.append(time.perf_counter() - start)
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(ordered), "throughput": len(ordered) / wall,
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[min(len(ordered) - 1,
                                                                                        int(0.99 * len(ordered)))]}


def requests_for(tasks: list[str], per_task_url: dict[str, str] | None, url: str | None) -> list[tuple[str, dict]]:
    """One text per request, tasks round-robin: with the task field (multi-task) or to the task's own server."""
    out = []
    for i in range(32):
        task = tasks[i % len(tasks)]
        text = " ".join(WORDS[(i * 7) % len(WORDS):] + WORDS[: (i * 3) % len(WORDS)])
        if per_task_url is None:
            out.append((url, {"dataframe_split": {"columns": ["task", "text"], "data": [[task, text]]}}))
        else:
            out.append((per_task_url[task], {"dataframe_split": {"columns": ["text"], "data": [[text]]}}))
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--experts", nargs="+", metavar="TASK=DIR", help="skeleton folders (default: 4 synthetic)")
    parser.add_argument("--full", help="the full model's folder (a rate-0 skeleton; default: synthetic)")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0, help="per setup and client count")
    parser.add_argument("--max-requests", type=int, default=2000, help="per setup and client count")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import mlflow

    from flows.commands.serve_bench import synthetic_experts
    from tasks.mlflow_model import multitask_model, skeleton_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.experts:
            experts = dict(e.split("=", 1) for e in args.experts)
        else:  # the same synthetic experts as serve_bench.py: the real backbone, random neurons and adapters
            folders = synthetic_experts(args.backbone, [0.5, 0.65, 0.8, 0.9], 4, 64, tmp / "experts")
            experts = {f"task{i}": str(f) for i, f in enumerate(folders)}
        full = args.full or str(synthetic_experts(args.backbone, [0.0], 1, 64, tmp / "full")[0])
        models = {"multi": tmp / "multi", "full": tmp / "full-model"}
        mlflow.pyfunc.save_model(str(models["multi"]), **multitask_model(experts, args.backbone))
        mlflow.pyfunc.save_model(str(models["full"]), **skeleton_model(full))
        for task, folder in experts.items():
            models[task] = tmp / f"single-{task}"
            mlflow.pyfunc.save_model(str(models[task]), **skeleton_model(folder))

        tasks = list(experts)
        # (model names, uvicorn workers): a second worker process holds a second backbone, and works in parallel
        setups = {"multi-task server (1 backbone + 4 experts)": (["multi"], 1),
                  "multi-task server, 2 workers": (["multi"], 2),
                  "4 separate skeleton servers": (tasks, 1), "full model server": (["full"], 1)}
        results = []
        for setup, (names, workers) in setups.items():
            servers = {name: Server(models[name], tmp / f"{name}.log", workers) for name in names}
            try:
                for server in servers.values():
                    server.wait()
                if names == ["multi"]:
                    targets = requests_for(tasks, None, servers["multi"].url)
                elif names == ["full"]:  # the full model answers every task's texts alike
                    targets = requests_for(["full"], {"full": servers["full"].url}, None)
                else:
                    targets = requests_for(tasks, {t: servers[t].url for t in tasks}, None)
                for url, body in targets[:8]:  # warm-up: first calls load lazily
                    post(url, body)
                for clients in args.clients:
                    row = {"setup": setup, **load(targets, clients, args.seconds, args.max_requests)}
                    row["rss_mib"] = sum(s.rss_mib() for s in servers.values())
                    results.append(row)
                    print(f"{setup:45s} clients {clients:3d}: {row['throughput']:7.1f} req/s  p50 "
                          f"{row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  ({row['requests']} requests)  "
                          f"RSS {row['rss_mib']:.0f} MiB", flush=True)
            finally:
                for server in servers.values():
                    server.stop()
    environment = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "seconds": args.seconds,
                   "max_requests": args.max_requests, "backbone": args.backbone}
    if args.out:
        args.out.write_text(json.dumps({"environment": environment, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
