"""How `skeleton sweep` ends, whatever ends it, and the Prefect server it starts (docs/faults.md).

    with ended_by_signals(), sweep_server():
        flow(...)

`ended_by_signals`: SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt in the main thread, so the flow, its MLflow
run and the server are closed as on Ctrl-C; the first signal also starts a watchdog that kills the server and ends
the process GRACE_SECONDS later, should that cleanup hang (Prefect's event worker retries a stopped server's
websocket for minutes) or the KeyboardInterrupt be lost (one raised in a weakref callback during an import is only
printed).

`sweep_server`: without PREFECT_API_URL, Prefect would start an ephemeral server of its own (SubprocessASGIServer in
prefect/server/api/server.py), which a killed sweep leaves running. The command starts the same server itself (the
same uvicorn command and environment), tied to the sweep: the kernel kills it when the sweep dies, even by SIGKILL
(PR_SET_PDEATHSIG, Linux), it stays in the sweep's process group (`kill -- -PGID` stops both), and it is stopped
when the block ends.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_SECONDS = 5  # after a termination signal, cleanup's time before the watchdog ends the process
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_servers: set[subprocess.Popen] = set()  # what the watchdog kills before it ends the process


@contextmanager
def ended_by_signals() -> Iterator[None]:
    """Within: a termination signal raises KeyboardInterrupt (the first one only; later ones wait for the watchdog).
    Call from the main thread."""
    watchdog: list[threading.Timer] = []

    def interrupt(signum, frame):
        if not watchdog:
            watchdog.append(threading.Timer(GRACE_SECONDS, _hard_exit, (128 + signum,)))
            watchdog[0].daemon = True  # it must not keep a process that ended in time alive
            watchdog[0].start()
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in SIGNALS}
    try:
        yield
    except Exception as e:
        if watchdog:  # the KeyboardInterrupt, turned into an error of its own by a library it went through (pydantic)
            raise KeyboardInterrupt(str(e)) from e
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _hard_exit(code: int) -> None:
    for process in list(_servers):
        process.kill()
    print(f"skeleton: still not ended {GRACE_SECONDS} s after the signal: exiting now", file=sys.stderr, flush=True)
    os._exit(code)


@contextmanager
def sweep_server() -> Iterator[str]:
    """Prefect's API URL for the block: PREFECT_API_URL's if set (nothing started), else that of an ephemeral server
    started here, on 127.0.0.1 and a free port, and stopped when the block ends."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    process, url = _start()
    wait = GRACE_SECONDS / 2  # for each drain, then for the server to stop
    try:
        print(f"Prefect server for this sweep: {url} (it ends with the sweep)", flush=True)
        _wait_until_healthy(process, url)
        with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
            try:
                yield f"{url}/api"
            except KeyboardInterrupt:  # a signal: cleanup must fit the watchdog's grace on a busy machine too
                wait = GRACE_SECONDS / 5
                raise
            finally:  # task states and logs reach the server from these workers: before it stops
                EventsWorker.drain_all(timeout=wait)
                APILogWorker.drain_all(timeout=wait)
    finally:
        _servers.discard(process)
        process.terminate()
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start() -> tuple[subprocess.Popen, str]:
    """Prefect's ephemeral server, started as SubprocessASGIServer does, on 127.0.0.1 and a free port; its address."""
    import prefect
    from prefect.settings import get_current_settings

    with socket.socket() as sock:  # a free port, as the kernel picks one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"], env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()))  # noqa: PLW1509
    _servers.add(process)
    return process, f"http://127.0.0.1:{port}"


def _wait_until_healthy(process: subprocess.Popen, url: str) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    deadline = time.monotonic() + timeout
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an HTTP proxy
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with direct.open(f"{url}/api/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    why = f"exited with code {process.returncode}" if process.returncode is not None else f"not healthy in {timeout} s"
    raise RuntimeError(f"Prefect's server for this sweep {why} ({url}): raise "
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine, or set PREFECT_API_URL to "
                       "a running server")


def _die_with(parent: int):
    """preexec_fn: the child gets SIGKILL when the thread that started it ends (the sweep's main thread: so when the
    sweep ends, however). Linux only; elsewhere the `finally` and the watchdog stop the server. libc is looked up
    here, in the parent: the child, forked from a process with threads, only makes two system calls."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the sweep died before the prctl: nobody would stop us
            os._exit(1)
    return preexec
