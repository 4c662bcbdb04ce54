"""Where the artifacts and the MLflow store live, and which stage folders a record names: plain Python (no Prefect,
no torch), so the commands that only read artifacts (gc, benchmark, list) start quickly. Read when called: set
SKELETON_ARTIFACTS or MLFLOW_TRACKING_URI at any time before."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = "inputs.json"  # beside a stage folder's record: the inputs its name was hashed from (tasks/pipeline.py)


def artifacts_dir() -> Path:
    return Path(os.environ.get("SKELETON_ARTIFACTS", ROOT / "artifacts")).resolve()


def results_dir(root: Path | None = None) -> Path:
    """Where Prefect keeps the stages' result records (tasks/pipeline.py): in the artifacts folder, beside the stage
    folders they name."""
    return (root or artifacts_dir()) / ".prefect-results"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the checkout's SQLite store mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


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
