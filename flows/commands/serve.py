"""`skeleton serve`: task experts over HTTP, one backbone per worker, concurrent requests batched (LitServe).

    skeleton serve rotten_tomatoes=@production                      # the task's registered model at that alias
    skeleton serve sst=artifacts/skeletons/<hash> news=models:/<id>  # TASK=SOURCE: a folder, a model URI, @ALIAS
    skeleton serve artifacts/skeletons/<hash> ...                   # folders: each named by its neurons.json
    skeleton serve --workers 2 --max-batch-size 64 --batch-timeout-ms 5 ...

    curl -s 127.0.0.1:8000/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["task", "text"], "data": [["rotten_tomatoes", "a gripping film"]]}}'
    -> {"predictions": [{"task": "rotten_tomatoes", "label": "fresh", "probabilities": {"fresh": 0.91, ...}}]}

Requests take MLflow's scoring formats (`dataframe_split`, `dataframe_records`, `inputs`) with fields task and text
(task may be left out when one expert is served). Concurrent requests are gathered for up to --batch-timeout-ms or
--max-batch-size requests; each task's texts then run as one padded batch on that task's expert (skeleton.serve:
experts share the backbone's tensors, so nothing is swapped between tasks). A bad request gets a 400 whose message
names the problem, checked before it joins a batch; the server keeps serving. GET /health answers "ok" once every
worker has loaded its experts. Listens on 127.0.0.1 unless --host says otherwise. Each --workers process holds its
own backbone and experts (more throughput on more cores, more memory). The MLflow tracking store for @ALIAS and
models:/ sources is $MLFLOW_TRACKING_URI, else the sweep's mlflow.db.
"""
# No `from __future__ import annotations` here: LitServe hands decode_request's annotation to FastAPI as the type
# of the request body, which must be the class itself.
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import litserve as ls
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from skeleton.inputs import check_texts

FIELDS = ("task", "text")
# Measured on 2 cores (docs/results.md, "Served speed-up"): at 64 clients batches of ~17 requests form; waiting 5 ms
# for company took the skeleton's served speed-up from 1.45x to 1.56x there and kept a lone caller's p99 under 27 ms.
MAX_BATCH_SIZE, BATCH_TIMEOUT_MS = 64, 5.0


class Split(BaseModel):
    columns: list[str]
    data: list[list[Any]]


class Invocation(BaseModel):
    """A request body in one of MLflow's scoring formats, checked whole before it reaches a worker (a bad request
    must fail alone, not the batch it would have joined)."""

    model_config = ConfigDict(extra="forbid")
    dataframe_split: Split | None = None
    dataframe_records: list[dict[str, Any]] | None = None
    inputs: list[dict[str, Any]] | dict[str, list[Any]] | None = None
    tasks: ClassVar[tuple[str, ...]] = ()  # the served experts' names: set once at start-up, before the API forks
    _rows: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def rows_of_known_tasks(self) -> "Invocation":
        given = [name for name in ("dataframe_split", "dataframe_records", "inputs") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("the body needs exactly one of 'dataframe_split', 'dataframe_records' or 'inputs', got "
                             f"{', '.join(map(repr, given)) or 'none'}")
        columns = _columns(self)
        if "task" not in columns and len(self.tasks) == 1:  # one expert: the task may go without saying
            columns["task"] = [self.tasks[0]] * len(columns.get("text", []))
        missing = [c for c in FIELDS if c not in columns]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}; each row needs task and text")
        tasks, texts = columns["task"], columns["text"]
        check_texts(texts)
        unknown = sorted({str(t) for t in tasks} - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; served tasks: {', '.join(self.tasks)}")
        self._rows = [(str(task), text) for task, text in zip(tasks, texts)]
        return self


def _columns(body: Invocation) -> dict[str, list]:
    """The body's fields as columns of equal length."""
    if body.dataframe_split is not None:
        split = body.dataframe_split
        bad = [i for i, row in enumerate(split.data) if len(row) != len(split.columns)]
        if bad:
            raise ValueError(f"dataframe_split row {bad[0]} has {len(split.data[bad[0]])} values for "
                             f"{len(split.columns)} columns")
        return {c: [row[j] for row in split.data] for j, c in enumerate(split.columns)}
    records = body.dataframe_records if body.dataframe_records is not None else body.inputs
    if isinstance(records, dict):
        lengths = {len(v) for v in records.values()}
        if len(lengths) > 1:
            raise ValueError(f"'inputs' columns have different lengths: {sorted(lengths)}")
        return dict(records)
    keys = [key for key in FIELDS if all(key in record for record in records)]
    return {key: [record[key] for record in records] for key in keys}


async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """400 with the first problem in words (FastAPI's default is a 422 listing pydantic's error records)."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if first["type"] == "json_invalid":
        message = f"the body is not valid JSON ({cause or first['msg']})"
    elif cause is not None:
        message = str(cause)
    else:
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where or 'body'}: {first['msg']}"
    return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": message}, status_code=400)


class ExpertsAPI(ls.LitAPI):
    """One worker: a SkeletonServer with every expert; a batch of requests is answered one padded batch per task."""

    def __init__(self, experts: dict[str, str], backbone: str, threads: int | None, stats: bool,
                 max_batch_size: int, batch_timeout: float, device: str = "cpu", execution: str = "eager"):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/invocations")
        self.expert_folders, self.backbone_source, self.threads, self.stats = experts, backbone, threads, stats
        self.device, self.execution = device, execution

    def setup(self, device):
        import torch

        from skeleton.serve import SkeletonServer

        if self.threads:
            torch.set_num_threads(self.threads)
        # --device as resolved, not LitServe's `device` (which names cuda:0 for one GPU, whatever cuda:N was asked)
        self.server = SkeletonServer.load(self.backbone_source, device=self.device, execution=self.execution)
        for task, folder in self.expert_folders.items():
            self.server.add(folder, name=task)

    def decode_request(self, request: Invocation) -> list[tuple[str, str]]:
        return request._rows

    def batch(self, inputs: list[list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
        return inputs

    def predict(self, requests):
        if self.max_batch_size == 1:  # LitServe hands over one request's rows, not a batch of requests
            return self.predict([requests])[0]
        rows = [row for request in requests for row in request]
        answers = self.server.serve(rows, batch_size=max(len(rows), 1))
        if self.stats:
            self.log("batch", len(requests))
        out, start = [], 0
        for request in requests:
            out.append(answers[start : start + len(request)])
            start += len(request)
        return out

    def unbatch(self, output):
        return output

    def encode_response(self, answers) -> Response:
        # JSON made here, in the worker: the HTTP process then sends the bytes as they are (FastAPI would walk a
        # returned dict through its encoder first, in the process that parses every request)
        body = {"predictions": [{"task": a.task, "label": a.label, "probabilities": a.probabilities} for a in answers]}
        return Response(json.dumps(body).encode(), media_type="application/json")


class BatchStats(ls.Logger):
    """How many requests each batch held, counted in LitServe's logger process and written to `path` (JSON: size ->
    batches) after every batch: what the load benchmark reads."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.counts = path, {}

    def process(self, key, value):
        self.counts[value] = self.counts.get(value, 0) + 1
        tmp = f"{self.path}.tmp"
        Path(tmp).write_text(json.dumps(self.counts))
        os.replace(tmp, self.path)


def resolve_experts(specs: list[str], dst: Path) -> dict[str, str]:
    """Expert name -> skeleton folder for each TASK=SOURCE (SOURCE: a folder, models:/..., @ALIAS) or FOLDER."""
    from skeleton.folder import SkeletonFolder

    experts: dict[str, str] = {}
    for spec in specs:
        task, _, source = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        if "=" in spec and not (task and source):
            raise SystemExit(f"serve: an expert is TASK=SOURCE or a skeleton folder, got {spec!r}")
        if source.startswith("@") and not task:
            raise SystemExit(f"serve: {spec!r}: an alias names the task's registered model, give it as TASK=@ALIAS")
        if source.startswith(("@", "models:/", "runs:/")):
            import mlflow

            from tasks.mlflow_model import expert_folder
            from tasks.tracking import tracking_uri

            mlflow.set_tracking_uri(tracking_uri())
            folder = expert_folder(task or "expert", source, dst)
        else:
            folder = Path(source)
        folder = SkeletonFolder(folder)
        if not folder.exists():
            raise SystemExit(f"serve: {source} is not a skeleton folder: give an exported folder, models:/<id> or "
                             "@ALIAS")
        folder.verify()  # a damaged folder: one line now, not a worker that fails to start
        name = task or folder.name()
        if name in experts:
            raise SystemExit(f"serve: two experts are named {name!r}: name them, TASK=SOURCE")
        experts[name] = str(folder.path)
    return experts


def recorded_backbone(experts: dict[str, str]) -> str:
    """The backbone every expert records (one for all), or SystemExit naming the disagreement."""
    from skeleton.folder import SkeletonFolder

    recorded = {name: SkeletonFolder(folder).record().get("backbone") for name, folder in experts.items()}
    found = set(recorded.values())
    if len(found) != 1 or None in found:
        raise SystemExit("serve: the experts do not record one backbone (" + ", ".join(
            f"{n}: {b}" for n, b in recorded.items()) + "); pass --backbone NAME_OR_FOLDER")
    return found.pop()


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("experts", nargs="+", metavar="TASK=SOURCE|FOLDER", help="the task experts to serve")
    p.add_argument("--backbone", help="backbone name or folder (default: the one the experts record)")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, help="inference processes, each with its own backbone and experts "
                   "(default: one per CPU core with one torch thread each; 1 on a GPU)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / workers)")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE, help="requests per batch at most")
    p.add_argument("--batch-timeout-ms", type=float, default=BATCH_TIMEOUT_MS,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: the first GPU if torch sees one, "
                   "else the CPU")
    p.add_argument("--execution", default="eager", choices=["eager", "graph", "compile"],
                   help="how the experts' passes run: eager, graph (CUDA-graph replay of padded shape buckets, a "
                   "GPU's launch overhead gone) or compile (torch.compile); see docs/benchmark.md")
    p.add_argument("--stats", metavar="FILE", help="write how many requests each batch held to FILE (JSON)")
    return p


def resolve_device(device: str, execution: str) -> str:
    """skeleton.train.resolve_device's answer for --device, with --execution checked for it (a device this machine
    lacks: one line now, not a worker's traceback). Asked in a child process: torch stays out of the HTTP process
    (190 MB of it)."""
    if device == "cpu" and execution != "graph":
        return device
    check = ("import sys\nfrom skeleton.execution import check_mode\nfrom skeleton.train import resolve_device\n"
             "try:\n    device = resolve_device(sys.argv[1])\n    check_mode(sys.argv[2], device)\n    print(device)\n"
             "except ValueError as e:\n    sys.exit(str(e))\n")
    done = subprocess.run([sys.executable, "-c", check, device, execution], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"serve: {(done.stderr.strip().splitlines() or ['cannot resolve --device'])[-1]}")
    return done.stdout.strip()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog).parse_args(argv)
    for name in ("workers", "max_batch_size", "port"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"serve: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_timeout_ms < 0 or (args.threads is not None and args.threads < 1):
        raise SystemExit("serve: --batch-timeout-ms must be 0 or more and --threads at least 1")
    device = resolve_device(args.device, args.execution)
    with tempfile.TemporaryDirectory(prefix="skeleton-serve-") as tmp:
        experts = resolve_experts(args.experts, Path(tmp))
        backbone = args.backbone or recorded_backbone(experts)
        Invocation.tasks = tuple(sorted(experts))
        cuda = device.startswith("cuda")
        workers = args.workers or (1 if cuda else os.cpu_count() or 1)
        threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
        api = ExpertsAPI(experts, backbone, threads, bool(args.stats), args.max_batch_size,
                         args.batch_timeout_ms / 1000, device, args.execution)
        server = ls.LitServer(api, accelerator="cuda" if cuda else "cpu", workers_per_device=workers,
                              loggers=[BatchStats(args.stats)] if args.stats else None,
                              disable_openapi_url=True, fast_queue=True)
        server.app.add_exception_handler(RequestValidationError, bad_request)
        # SIGTERM (a service manager, `timeout`, the load benchmark) stops the workers as Ctrl-C does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(f"serving {', '.join(experts)} on http://{args.host}:{args.port}/invocations "
              f"({workers} worker(s) x {threads} thread(s), batches of up to {args.max_batch_size} requests "
              f"within {args.batch_timeout_ms:g} ms)", flush=True)
        # One HTTP process whatever the workers: parsing is cheap, and a second one took CPU from the models (2 cores)
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning",
                   num_api_servers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
