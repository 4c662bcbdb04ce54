"""Start, stop and inspect the local Skeleton stack: Prefect server + process worker, MLflow tracking server.

    skeleton stack up        # or `make stack-up`: servers, work pool, `prefect deploy --all`, worker
    skeleton stack status    # or `make stack-status`
    skeleton stack down      # or `make stack-down`

Everything listens on 127.0.0.1 only and keeps its state in one folder (default `.stack/`, git-ignored):
`prefect/` (PREFECT_HOME, SQLite database), `mlflow.db`, `mlartifacts/`, `logs/NAME.log`, `pids/NAME.pid`,
and `env` (the export lines; `source .stack/env`). Ports: --prefect-port / SKELETON_PREFECT_PORT (4200),
--mlflow-port / SKELETON_MLFLOW_PORT (5000); folder: --state / SKELETON_STACK_DIR. Telemetry is off.
`up` is idempotent: what already runs is left alone, stale PID files (dead processes) are cleared.
Standard library only: this script never imports torch, Prefect or MLflow itself.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.paths import ROOT

POOL = "skeleton-pool"
SERVICES = ("prefect-server", "mlflow", "worker")  # stopped in reverse order: the worker first
TOKEN = {"prefect-server": "prefect", "worker": "prefect", "mlflow": "mlflow"}  # expected in the command line


class StackError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"stack: {message}")


def urls(args) -> dict[str, str]:
    return {"prefect": f"http://127.0.0.1:{args.prefect_port}", "mlflow": f"http://127.0.0.1:{args.mlflow_port}"}


def environment(args) -> dict[str, str]:
    """The environment of every process we start (the worker passes it on to its flow runs)."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PWD": str(ROOT),
        "PREFECT_HOME": str(args.state / "prefect"),
        "PREFECT_API_URL": urls(args)["prefect"] + "/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": urls(args)["mlflow"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    })
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # 8 job-runner processes (~2 GB) we never use
    return env


def commands(args) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "prefect-server": [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                           "--port", str(args.prefect_port), "--analytics-off"],
        "worker": [py, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                   "--name", f"skeleton-worker-{args.prefect_port}"],
        "mlflow": [py, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{args.state / 'mlflow.db'}",
                   "--artifacts-destination", str(args.state / "mlartifacts"),
                   "--host", "127.0.0.1", "--port", str(args.mlflow_port), "--workers", "1"],
    }


# --- processes ----------------------------------------------------------------------------------------------
def pid_file(args, name: str) -> Path:
    return args.state / "pids" / f"{name}.pid"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def running(args, name: str) -> int | None:
    """The PID of our running `name`, or None; a PID file naming a dead or foreign process is removed."""
    path = pid_file(args, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        ours = TOKEN[name] in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        ours = True  # no /proc (macOS): trust a live PID
    if alive(pid) and ours:
        return pid
    print(f"stack: removing stale PID file {path} (process {pid} is gone)")
    path.unlink(missing_ok=True)
    return None


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (flow runs start in their own session, so the group alone misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the servers; TIME_WAIT is no clash
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start(args, name: str, env: dict[str, str]) -> subprocess.Popen:
    log = open(args.state / "logs" / f"{name}.log", "ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(commands(args)[name])}\n".encode())
    log.flush()
    proc = subprocess.Popen(commands(args)[name], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    pid_file(args, name).write_text(f"{proc.pid}\n")
    print(f"stack: started {name} (pid {proc.pid}, log {log.name})")
    return proc


def wait_for(args, name: str, proc: subprocess.Popen | None, ready) -> None:
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode}; see {args.state / 'logs' / name}.log")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{name} not ready after {args.timeout:.0f} s; see {args.state / 'logs' / name}.log")


def http(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def prefect_cli(args, env: dict[str, str], *argv: str) -> None:
    """A one-shot Prefect command from the project root; its output goes to logs/deploy.log."""
    with open(args.state / "logs" / "deploy.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} prefect {' '.join(argv)}\n".encode())
        log.flush()
        code = subprocess.run([sys.executable, "-m", "prefect", *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-15:])
        raise StackError(f"`prefect {' '.join(argv)}` failed (exit {code}); end of {log.name}:\n{tail}\n"
                         "fix it and run `up` again (what already runs is kept), or `down`")


# --- commands -----------------------------------------------------------------------------------------------
def up(args) -> None:
    # A script started in the background by a non-interactive shell inherits SIGINT ignored, and so would our
    # children; the worker stops on SIGINT (it turns SIGTERM into one), so give them the default back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sub in ("pids", "logs", "prefect"):
        (args.state / sub).mkdir(parents=True, exist_ok=True)
    pids = {name: running(args, name) for name in SERVICES}
    recorded = args.state / "ports.json"
    if any(pids.values()) and recorded.exists():  # keep the ports of what already runs
        vars(args).update(json.loads(recorded.read_text()))
    recorded.write_text(json.dumps({"prefect_port": args.prefect_port, "mlflow_port": args.mlflow_port}))
    if all(pids.values()):
        print("stack: already running")
        return status(args)
    for name, port, option in (("prefect-server", args.prefect_port, "prefect-port"),
                               ("mlflow", args.mlflow_port, "mlflow-port")):
        if not pids[name] and not port_free(port):
            raise StackError(f"port {port} on 127.0.0.1 ({name}) is in use by another program; choose another with "
                             f"--{option} N or SKELETON_{option.upper().replace('-', '_')}=N, or stop that program")
    env = environment(args)
    procs = {name: start(args, name, env) for name in ("prefect-server", "mlflow") if not pids[name]}
    api = env["PREFECT_API_URL"]
    wait_for(args, "prefect-server", procs.get("prefect-server"), lambda: http(f"{api}/health") is True)
    prefect_cli(args, env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    prefect_cli(args, env, "--no-prompt", "deploy", "--all")
    print("stack: work pool and deployments registered (prefect.yaml)")
    if not pids["worker"]:
        procs["worker"] = start(args, "worker", env)
        name = commands(args)["worker"][-1]
        wait_for(args, "worker", procs["worker"], lambda: any(
            w["name"] == name and w.get("status") == "ONLINE" for w in http(f"{api}/work_pools/{POOL}/workers/filter", {})))
    wait_for(args, "mlflow", procs.get("mlflow"), lambda: urllib.request.urlopen(urls(args)["mlflow"] + "/health",
                                                                                 timeout=5).status == 200)
    (args.state / "env").write_text(f"export PREFECT_API_URL={api}\nexport MLFLOW_TRACKING_URI={urls(args)['mlflow']}\n")
    print(f"""
Skeleton stack is up (state and logs in {args.state}):
  Prefect UI  {urls(args)['prefect']}
  MLflow UI   {urls(args)['mlflow']}   (experiment `skeleton`)
In your shell (or `source {args.state / 'env'}`):
  export PREFECT_API_URL={api}
  export MLFLOW_TRACKING_URI={urls(args)['mlflow']}
Then: prefect deployment run skeleton/full-sweep [-p task=reuters_r8 -p 'rates=[0.5,0.8]']
Stop: skeleton stack down   (make stack-down)""")


def down(args) -> None:
    for name in reversed(SERVICES):
        pid = running(args, name)
        if pid is None:
            continue
        group = [pid, *descendants(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for target in group:
                try:
                    os.killpg(target, sig) if target == pid else os.kill(target, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + args.stop_timeout
            while time.monotonic() < deadline and any(alive(p) for p in group):
                time.sleep(0.2)
            if not any(alive(p) for p in group):
                break
            print(f"stack: {name} ignored SIGTERM for {args.stop_timeout:.0f} s, killing it")
        pid_file(args, name).unlink(missing_ok=True)
        print(f"stack: stopped {name} (pid {pid})")
    print("stack: down")


def status(args) -> None:
    links = {"prefect-server": urls(args)["prefect"], "mlflow": urls(args)["mlflow"], "worker": f"pool {POOL}"}
    for name in SERVICES:
        pid = running(args, name)
        print(f"  {name:15} {'running (pid %d)' % pid if pid else 'stopped':20} {links[name]}")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("SKELETON_PREFECT_PORT", 4200)))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("SKELETON_MLFLOW_PORT", 5000)))
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("SKELETON_STACK_DIR", ROOT / ".stack")),
                        help="state folder: databases, artifacts, logs, PID files")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each service to be ready")
    parser.add_argument("--stop-timeout", type=float, default=15, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    args.state = args.state.resolve()
    if args.command == "status" and (args.state / "ports.json").exists():
        vars(args).update(json.loads((args.state / "ports.json").read_text()))
    {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    main()
