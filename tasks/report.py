"""The sweep's results table and its accuracy-versus-sparsity plot."""
from __future__ import annotations

from pathlib import Path

COLUMNS = ["method", "rate", "kept_width", "accuracy", "macro_f1", "speedup", "parameters", "path"]
EXTRA = ["val_accuracy", "logits"]  # kept in the records and the Parquet table, not printed


def results_table(rows: list[dict], full: dict, probe: dict):
    """One row per skeleton, plus the full prompt-tuned model and the linear probe as reference rows."""
    import pandas as pd

    reference = [
        {"method": "full (prompt tuning)", "rate": 0.0, "accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
         "speedup": 1.0, "parameters": full["parameters"], "path": full["path"], "logits": full["logits"]},
        {"method": "linear probe", "rate": 0.0, "accuracy": probe["accuracy"], "macro_f1": probe["macro_f1"]},
    ]
    table = pd.DataFrame(reference + sorted(rows, key=lambda r: (r["method"], r["rate"])))
    return table.reindex(columns=COLUMNS + EXTRA).astype({"kept_width": "Int64", "parameters": "Int64"})


def plot_accuracy(rows: list[dict], full: dict, probe: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        points = sorted((r["rate"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(full["accuracy"], color="black", linestyle="--", label="full prompt-tuned")
    ax.axhline(probe["accuracy"], color="grey", linestyle=":", label="linear probe")
    ax.set_xlabel("FFN pruning rate")
    ax.set_ylabel("test accuracy")
    ax.set_title("Skeleton accuracy vs sparsity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
