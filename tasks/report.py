"""The sweep's results table and its plots: accuracy and speed-up against sparsity, the nightly history."""
from __future__ import annotations

from pathlib import Path

COLUMNS = ["method", "rate", "kept_width", "accuracy", "macro_f1", "speedup", "speedup_bound", "bound_ratio",
           "parameters", "path"]
EXTRA = ["val_accuracy", "logits"]  # kept in the records and the Parquet table, not printed
FULL, PROBE = "full (prompt tuning)", "linear probe"  # the reference rows


def results_table(rows: list[dict], full: dict, probe: dict):
    """One row per skeleton, plus the full prompt-tuned model and the linear probe as reference rows."""
    import pandas as pd

    reference = [
        {"method": FULL, "rate": 0.0, "accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
         "speedup": 1.0, "speedup_bound": 1.0, "bound_ratio": 1.0, "parameters": full["parameters"],
         "path": full["path"], "logits": full["logits"], "val_accuracy": full["val_accuracy"]},
        {"method": PROBE, "rate": 0.0, "accuracy": probe["accuracy"], "macro_f1": probe["macro_f1"],
         "val_accuracy": probe["val_accuracy"]},
    ]
    table = pd.DataFrame(reference + sorted(rows, key=lambda r: (r["method"], r["rate"])))
    return table.reindex(columns=COLUMNS + EXTRA).astype({"kept_width": "Int64", "parameters": "Int64"})


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_history(history, out: Path) -> Path:
    """Speed-up per reference rate over nights; regressed nights marked with a red x."""
    fig, ax = _axes()
    for rate, nights in history.groupby("rate"):
        ax.plot(range(len(nights)), nights["speedup"], marker="o", label=f"p={rate}")
        bad = [i for i, r in enumerate(nights["regression"]) if r]
        ax.scatter(bad, nights["speedup"].iloc[bad], color="red", marker="x", s=80, zorder=3)
    ax.set_xlabel("night")
    ax.set_ylabel("speed-up over the full model")
    ax.set_title("Nightly benchmark: speed-up history")
    ax.legend()
    return _save(fig, out)


def plot_accuracy(records: list[dict], out: Path) -> Path:
    """Accuracy against pruning rate, a line per selection method, the reference rows as horizontal lines."""
    reference = {r["method"]: r for r in records if r["method"] in (FULL, PROBE)}
    rows = [r for r in records if r["method"] not in reference]
    full, probe = reference[FULL], reference[PROBE]
    fig, ax = _axes()
    for method in sorted({r["method"] for r in rows}):
        points = sorted((r["rate"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(full["accuracy"], color="black", linestyle="--", label="full prompt-tuned")
    ax.axhline(probe["accuracy"], color="grey", linestyle=":", label="linear probe")
    ax.set_xlabel("FFN pruning rate")
    ax.set_ylabel("test accuracy")
    ax.set_title("Skeleton accuracy vs sparsity")
    ax.legend(loc="lower left")
    return _save(fig, out)


def plot_speedup(records: list[dict], out: Path) -> Path:
    """Measured speed-up against pruning rate, a line per selection method, beside the arithmetic bound
    (MACs of the full model / MACs of the skeleton), each point labelled with measured / bound."""
    rows = [r for r in records if r["method"] not in (FULL, PROBE) and r.get("speedup") is not None]
    fig, ax = _axes()
    bound = sorted({(0.0, 1.0)} | {(r["rate"], r["speedup_bound"]) for r in rows})
    ax.plot(*zip(*bound), color="black", linestyle="--", marker="s", label="arithmetic bound (MACs)")
    for method in sorted({r["method"] for r in rows}):
        points = sorted((r["rate"], r["speedup"], r["bound_ratio"]) for r in rows if r["method"] == method)
        line, = ax.plot([0.0] + [p[0] for p in points], [1.0] + [p[1] for p in points], marker="o", label=method)
        for rate, speedup, ratio in points:
            ax.annotate(f"{ratio:.2f}", (rate, speedup), textcoords="offset points", xytext=(4, -12), fontsize=8,
                        color=line.get_color())
    ax.set_xlabel("FFN pruning rate")
    ax.set_ylabel("speed-up over the full model")
    ax.set_title("Measured speed-up vs arithmetic bound")
    ax.text(0.98, 0.02, "numbers: measured / bound", transform=ax.transAxes, ha="right", fontsize=8)
    ax.legend(loc="upper left")
    return _save(fig, out)
