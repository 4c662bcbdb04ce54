"""Where the artifacts live, and which stage folders a record names: plain Python (no Prefect, no torch), so the
commands that only read artifacts (gc, benchmark, list) start quickly."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def artifacts_dir() -> Path:
    return Path(os.environ.get("SKELETON_ARTIFACTS", ROOT / "artifacts")).resolve()


def stage_folders(record, root: Path | None = None) -> set[Path]:
    """The stage folders (<root>/<stage>/<hash>, root the artifacts folder) that paths anywhere in a record point
    into."""
    root, found = root or artifacts_dir(), set()
    stack = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += value.values()
        elif isinstance(value, list):
            stack += value
        elif isinstance(value, str) and value.startswith(str(root) + os.sep):
            parts = Path(value).relative_to(root).parts
            if len(parts) >= 2 and not parts[0].startswith("."):
                found.add(root / parts[0] / parts[1])
    return found
