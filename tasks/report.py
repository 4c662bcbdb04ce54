"""The sweep's results table and its plots: accuracy and speed-up against sparsity, the nightly history."""
from __future__ import annotations

from pathlib import Path

COLUMNS = ["seed", "method", "point", "rate", "head_rate", "kept_width", "accuracy", "macro_f1", "speedup", "speedup_bound",
           "bound_ratio", "parameters", "path"]
EXTRA = ["val_accuracy", "kept_widths", "kept_heads", "logits"]  # in the records and the Parquet table
SUMMARY = ["method", "point", "rate", "head_rate", "kept_width", "accuracy", "accuracy_std", "macro_f1", "val_accuracy",
           "speedup", "speedup_bound", "bound_ratio", "parameters", "seeds", "path"]
FULL, PROBE = "full (prompt tuning)", "linear probe"  # the reference rows
POINT = ["method", "point"]  # what identifies a sweep point across seeds: "p=<rate> h=<head rate>" or "x<target>"


def results_table(rows: list[dict], fulls: dict[int, dict], probes: dict[int, dict]):
    """Per seed: the full prompt-tuned model and the linear probe as reference rows, then one row per skeleton."""
    import pandas as pd

    reference = []
    for seed, full in fulls.items():
        probe = probes[seed]
        reference += [
            {"seed": seed, "method": FULL, "point": "", "rate": 0.0, "head_rate": 0.0, "accuracy": full["accuracy"],
             "macro_f1": full["macro_f1"], "speedup": 1.0, "speedup_bound": 1.0, "bound_ratio": 1.0,
             "parameters": full["parameters"], "path": full["path"], "logits": full["logits"],
             "val_accuracy": full["val_accuracy"]},
            {"seed": seed, "method": PROBE, "point": "", "rate": 0.0, "head_rate": 0.0, "accuracy": probe["accuracy"],
             "macro_f1": probe["macro_f1"], "val_accuracy": probe["val_accuracy"]},
        ]
    points = sorted(rows, key=lambda r: (r["seed"], r["method"], r["rate"], r["head_rate"]))
    table = pd.DataFrame(reference + points)
    return table.reindex(columns=COLUMNS + EXTRA).astype({"kept_width": "Int64", "parameters": "Int64"})


def summary_table(records: list[dict]):
    """One row per sweep point (and reference row): means over seeds, the accuracy's standard deviation across
    them (empty with one seed), the number of seeds and the first seed's exported model."""
    import pandas as pd

    table = pd.DataFrame(records).reindex(columns=COLUMNS + EXTRA)
    grouped = table.groupby(POINT, sort=False, dropna=False)
    summary = grouped.agg(rate=("rate", "mean"), head_rate=("head_rate", "mean"), kept_width=("kept_width", "first"), accuracy=("accuracy", "mean"),
                          accuracy_std=("accuracy", "std"), macro_f1=("macro_f1", "mean"),
                          val_accuracy=("val_accuracy", "mean"), speedup=("speedup", "mean"),
                          speedup_bound=("speedup_bound", "mean"), bound_ratio=("bound_ratio", "mean"),
                          parameters=("parameters", "first"), seeds=("seed", "nunique"), path=("path", "first"))
    summary = summary.reset_index()
    order = {FULL: 0, PROBE: 1}
    summary = summary.sort_values(["method", "rate", "head_rate"], kind="stable",
                                  key=lambda col: col.map(order).fillna(2) if col.name == "method" else col)
    return summary[SUMMARY].astype({"kept_width": "Int64", "parameters": "Int64"}).reset_index(drop=True)


def _label(row: dict) -> str:
    """A plotted series: a method at one head rate; joint-budget points (chosen per seed) stand alone."""
    if row["point"].startswith("x"):
        return f"{row['method']} {row['point']} (joint)"
    return row["method"] + (f" h={row['head_rate']:g}" if row["head_rate"] else "")


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
    """Accuracy against pruning rate, a line per selection method (and head rate), the reference rows as
    horizontal lines; with several seeds, the mean with a bar of +- one standard deviation."""
    summary = summary_table(records).to_dict("records")
    reference = {r["method"]: r for r in summary if r["method"] in (FULL, PROBE)}
    rows = [r for r in summary if r["method"] not in reference]
    fig, ax = _axes()
    for label in sorted({_label(r) for r in rows}):
        points = sorted((r["rate"], r["accuracy"], r["accuracy_std"]) for r in rows if _label(r) == label)
        rates, accuracy, std = zip(*points)
        ax.errorbar(rates, accuracy, yerr=[0 if s != s else s for s in std], marker="o", capsize=3, label=label)
    for name, style in ((FULL, dict(color="black", linestyle="--")), (PROBE, dict(color="grey", linestyle=":"))):
        ax.axhline(reference[name]["accuracy"], label=name, **style)
    seeds = int(reference[FULL]["seeds"])
    ax.set_xlabel("FFN pruning rate")
    ax.set_ylabel("test accuracy" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title("Skeleton accuracy vs sparsity")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, out)


def plot_speedup(records: list[dict], out: Path) -> Path:
    """Measured speed-up against pruning rate, a line per selection method, beside the arithmetic bound
    (MACs of the full model / MACs of the skeleton), each point labelled with measured / bound."""
    rows = [r for r in summary_table(records).to_dict("records")
            if r["method"] not in (FULL, PROBE) and r.get("speedup") == r.get("speedup")]
    fig, ax = _axes()
    for head_rate in sorted({r["head_rate"] for r in rows}):
        bound = sorted({(0.0, 1.0)} | {(r["rate"], r["speedup_bound"]) for r in rows if r["head_rate"] == head_rate})
        ax.plot(*zip(*bound), color="black", linestyle="--", marker="s", alpha=1.0 if head_rate == 0 else 0.5,
                label="arithmetic bound (MACs)" + (f" h={head_rate:g}" if head_rate else ""))
    for label in sorted({_label(r) for r in rows}):
        points = sorted((r["rate"], r["speedup"], r["bound_ratio"]) for r in rows if _label(r) == label)
        line, = ax.plot([0.0] + [p[0] for p in points], [1.0] + [p[1] for p in points], marker="o", label=label)
        for rate, speedup, ratio in points:
            ax.annotate(f"{ratio:.2f}", (rate, speedup), textcoords="offset points", xytext=(4, -12), fontsize=8,
                        color=line.get_color())
    ax.set_xlabel("FFN pruning rate")
    ax.set_ylabel("speed-up over the full model")
    ax.set_title("Measured speed-up vs arithmetic bound")
    ax.text(0.98, 0.02, "numbers: measured / bound", transform=ax.transAxes, ha="right", fontsize=8)
    ax.legend(loc="upper left")
    return _save(fig, out)
