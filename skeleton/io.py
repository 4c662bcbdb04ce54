"""Stage folders that cannot lie: written atomically with a manifest, verified before reuse, one writer at a time.

A folder appears whole or not at all (atomic_dir); its manifest.json lists every file's SHA-256 (verify_dir), so a
folder damaged afterwards is refused; `locked` serializes the processes that could write one folder (two sweeps on
one artifacts folder); `failpoint` is the fault-injection hook of the kill-anywhere tests.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
RECORD = "record.json"  # a finished stage's result record, written last: a folder without one is unfinished


class ArtifactError(RuntimeError):
    """A stage folder that is missing, incomplete or corrupt; the message names the file and what to do."""


def failpoint(name: str) -> None:
    """SIGKILL this process when SKELETON_FAILPOINT names this point: a crash at an exact spot, for tests."""
    if os.environ.get("SKELETON_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder beside `target`; on success a manifest of its files is added (unless the body wrote
    one) and it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).exists():
            write_manifest(tmp)
        failpoint(f"rename:{target.parent.name}")  # the scratch folder is full, the target not yet there
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_dir(folder: str | os.PathLike, what: str = "stage folder", fix: str = "re-run the sweep: it rebuilds "
               "a missing or damaged stage folder") -> dict:
    """Every file of the manifest present with its checksum, or ArtifactError naming the first bad one."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{folder} is not a complete {what} ({MANIFEST} unreadable: {e}); {fix}") from None
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise ArtifactError(f"{what} file {path} is missing or corrupt (checksum mismatch); {fix}")
    return manifest


def read_stage_record(folder: str | os.PathLike) -> dict | None:
    """The record of a finished, intact stage folder; None when it is missing, unfinished or corrupt."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text())
        verify_dir(folder)
    except (OSError, ValueError, ArtifactError):
        return None
    return record


def write_stage_record(folder: str | os.PathLike, record: dict) -> dict:
    """Mark a stage folder finished with its (JSON) record, atomically; returns the record as read back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # a stage that writes no files (a linear probe) gets a folder here
    if not (folder / MANIFEST).exists():
        write_manifest(folder)
    text = json.dumps(record, indent=1)
    tmp = folder / f".{RECORD}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, folder / RECORD)
    return json.loads(text)


@contextlib.contextmanager
def locked(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `target`'s lock file (beside it). The kernel drops it when the process dies, so a
    killed writer never blocks the next; then the scratch folders of a killed writer are cleared."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in target.parent.glob(f".{target.name}.*-*"):  # .tmp-/.old- of a writer that died
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stable_hash(obj: object, length: int = 12) -> str:
    """Short content hash of a JSON-able object: names artifact folders by the inputs that made them."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
