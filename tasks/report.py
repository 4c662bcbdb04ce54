"""The sweep's plots: accuracy and speed-up against sparsity, the accuracy-speed frontier, the nightly history.
(The tables they plot: tasks/results.py.)"""
from __future__ import annotations

from pathlib import Path

from skeleton.folder import model_name
from tasks.results import FINETUNED, FULL, FULL_PREFIX, FULLS, PROBE, REFERENCES, Row, main_full, summary_table


def _label(record: dict) -> str:
    """A plotted series: a method at one head rate (and prompt method, when not the input prompt); joint-budget
    points (chosen per seed) stand alone."""
    row = Row.of(record)
    joint = row.point.startswith("x")
    series = {**row.meta(), "rate": None, **({"head_rate": 0.0} if joint else {})}  # a series spans the rates
    return model_name(series, style="label") + (f" {row.point} (joint)" if joint else "")


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
    reference = {r["method"]: r for r in summary if r["method"] in REFERENCES}
    rows = [r for r in summary if r["method"] not in reference]
    fig, ax = _axes()
    for label in sorted({_label(r) for r in rows}):
        points = sorted((r["rate"], r["accuracy"], r["accuracy_std"]) for r in rows if _label(r) == label)
        rates, accuracy, std = zip(*points)
        ax.errorbar(rates, accuracy, yerr=[0 if s != s else s for s in std], marker="o", capsize=3, label=label)
    styles = {FULL: dict(color="black", linestyle="--"), FULL_PREFIX: dict(color="black", linestyle="-."),
              FINETUNED: dict(color="brown", linestyle="--"), PROBE: dict(color="grey", linestyle=":")}
    for name, row in reference.items():
        ax.axhline(row["accuracy"], label=name, **styles[name])
    seeds = main_full(summary).seeds
    ax.set_xlabel("FFN pruning rate")
    ax.set_ylabel("test accuracy" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title("Skeleton accuracy vs sparsity")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, out)


def plot_speedup(records: list[dict], out: Path) -> Path:
    """Measured speed-up against pruning rate, a line per selection method, beside the arithmetic bound
    (MACs of the full model / MACs of the skeleton), each point labelled with measured / bound."""
    rows = [r for r in summary_table(records).to_dict("records")
            if r["method"] not in REFERENCES and r.get("speedup") == r.get("speedup")]
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
    ax.set_ylabel("speed-up over the full model of the same prompt method")
    ax.set_title("Measured speed-up vs arithmetic bound")
    ax.text(0.98, 0.02, "numbers: measured / bound", transform=ax.transAxes, ha="right", fontsize=8)
    ax.legend(loc="upper left")
    return _save(fig, out)


def plot_frontier(records: list[dict], out: Path, max_drop: float | None = None) -> Path:
    """The accuracy-speed frontier: test accuracy (mean, bar +- one standard deviation over seeds) against the
    measured speed-up over the input-prompt full model (the paper's baseline), a line per selection method x prompt
    method through its rates, the full models and the fine-tuned reference as labelled points, the linear probe as
    a horizontal line. With --max-drop, the chosen models ringed and the budget as a line `max_drop` points below the
    best full model's test accuracy (the choice read validation accuracy: a chosen point may sit just below it).
    Results from before speedup_vs_input existed are drawn against their own full model."""
    summary = summary_table(records).to_dict("records")
    def known(value) -> bool:
        return value is not None and value == value  # not missing, not NaN

    x = "speedup_vs_input" if any(known(r.get("speedup_vs_input")) for r in summary) else "speedup"
    measured = [r for r in summary if known(r.get(x))]
    fig, ax = _axes()
    for label in sorted({_label(r) for r in measured if r["method"] not in REFERENCES}):
        points = sorted((r[x], r["accuracy"], r["accuracy_std"]) for r in measured
                        if r["method"] not in REFERENCES and _label(r) == label)
        speed, accuracy, std = zip(*points)
        ax.errorbar(speed, accuracy, yerr=[0 if s != s else s for s in std], marker="o", capsize=3, label=label)
    for row in (r for r in measured if r["method"] in REFERENCES):
        ax.errorbar([row[x]], [row["accuracy"]], yerr=[row["accuracy_std"] if known(row["accuracy_std"]) else 0],
                    marker="*", markersize=12, linestyle="none", capsize=3, label=row["method"])
    probe = next((r for r in summary if r["method"] == PROBE), None)
    if probe:
        ax.axhline(probe["accuracy"], color="grey", linestyle=":", label=PROBE)
    chosen = [r for r in measured if r.get("chosen")]
    seeds = main_full(summary).seeds
    if chosen:
        ax.scatter([r[x] for r in chosen], [r["accuracy"] for r in chosen], s=260, facecolors="none",
                   edgecolors="red", linewidths=2, zorder=3, label="chosen (--max-drop)")
        for row in chosen if seeds > 1 else ():  # each seed chooses its own: how many chose this one
            ax.annotate(f"{row['chosen']}/{seeds}", (row[x], row["accuracy"]), textcoords="offset points",
                        xytext=(9, 6), fontsize=8, color="red")
    if max_drop is not None:
        best = max(r["accuracy"] for r in summary if r["method"] in FULLS.values())
        ax.axhline(best - max_drop / 100, color="red", linestyle="--", linewidth=1,
                   label=f"--max-drop {max_drop:g}: best full model - {max_drop:g} pts")
    base = "the input-prompt full model" if x == "speedup_vs_input" else "the full model"  # older results
    ax.set_xlabel(f"measured speed-up over {base}")
    ax.set_ylabel("test accuracy" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title("Accuracy-speed frontier")
    ax.legend(loc="best", fontsize=7)
    return _save(fig, out)
