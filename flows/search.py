"""`--max-drop D`: the fastest skeleton whose validation accuracy is at most D points below the best full model.

    floor = best full model's validation accuracy (any prompt method) - D / 100
    per full model within the budget: probe pruning rates on LADDER by bisection (next_rate), grid points known
    after the benchmark, per seed: choose() the fastest model (skeleton or full) at or above the floor

Why bisection: validation accuracy falls with the pruning rate (not strictly: re-tuning is noisy), so the highest
passing rate is found in log2(len(LADDER)) ~ 4-5 builds instead of 19, each probe placed between the highest rate
that passed and the lowest above it that failed. The sweep's grid points (--rates) count as probes already made.
Validation decides, test only reports, with the interval a split of its size allows (drop_interval_on_test). Plain
Python at import time (torch loads to read the test logits); no Prefect.
"""
from __future__ import annotations

from collections.abc import Iterable

from tasks.results import FULLS, Row

LADDER = tuple(round(0.05 * i, 2) for i in range(1, 20))  # the rates a search considers: 0.05, 0.1, ..., 0.95
CONFIDENCE = 0.9  # of the test drop's interval in the report


def check_max_drop(points: float | None) -> float | None:
    if points is not None and not 0 <= points <= 100:  # NaN fails too
        raise ValueError(f"max_drop must be a number of accuracy points from 0 to 100 (e.g. 1.0: at most one point "
                         f"of validation accuracy below the best full model), got {points}")
    return points


def floor(fulls: Iterable[Row], max_drop: float) -> float:
    """The lowest validation accuracy within the budget: the best full model's minus max_drop points."""
    return max(row.val_accuracy for row in fulls) - max_drop / 100


def passes(row: Row, lowest: float) -> bool:
    return row.val_accuracy >= lowest - 1e-9  # accuracies are ratios of counts: no rounding should fail a tie


def next_rate(tried: dict[float, bool], ladder: Iterable[float] = LADDER) -> float | None:
    """The rate to build next (None: the search is over), given the rates tried so far and whether each passed:
    the middle untried ladder rate between the highest passing rate (0 if none) and the lowest failing one above
    it (1 if none)."""
    low = max((rate for rate, ok in tried.items() if ok), default=0.0)
    high = min((rate for rate, ok in tried.items() if not ok and rate > low), default=1.0)
    between = [rate for rate in ladder if low < rate < high and rate not in tried]
    return between[len(between) // 2] if between else None


def choose(rows: list[Row], max_drop: float) -> tuple[Row, float]:
    """(the chosen model of one seed's rows, the floor): the fastest (speed-up over the input-prompt full model) of
    the full models and skeletons whose validation accuracy passes the floor, the more accurate of equally fast
    ones. A full model always passes, so there is always a choice: the best full model when no skeleton fits."""
    fulls = [row for row in rows if row.method in FULLS.values()]
    lowest = floor(fulls, max_drop)
    candidates = [row for row in rows if (row.method in FULLS.values() or not row.is_reference) and passes(row, lowest)]
    return max(candidates, key=lambda row: (row.speedup_vs_input or 1.0, row.val_accuracy)), lowest


def choose_per_seed(rows: list[Row], max_drop: float) -> list[Row]:
    """Each seed's choice (choose), marked Row.chosen, in seed order."""
    chosen = []
    for seed in dict.fromkeys(row.seed for row in rows):
        row, _ = choose([r for r in rows if r.seed == seed], max_drop)
        row.chosen = True
        chosen.append(row)
    return chosen


def describe(rows: list[Row], max_drop: float, method: str) -> str:
    """The choices against the budget, a line per seed (and their spread over seeds): the model, its speed-up, test
    drop against the best full model on test (what a user gets), validation drop (what chose), and how many
    skeletons of `method` the search had (a grid over LADDER would build len(LADDER) per full model); then what the
    budget means. Markdown (a list, then a paragraph), as printed by the sweep and shown in its Prefect artifact and
    its MLflow run's description: the choice comes first, where a folded description still shows it."""
    lines, drops, speeds, verdicts = [], [], [], []
    for row in (r for r in rows if r.chosen):
        ours = [r for r in rows if r.seed == row.seed]
        fulls = [r for r in ours if r.method in FULLS.values()]
        best = max(fulls, key=lambda r: r.accuracy)  # on test: what a user would have had instead
        best_val, best_test = max(r.val_accuracy for r in fulls), best.accuracy
        built = {(r.prompt, r.rate) for r in ours if r.method == method and not r.head_rate and r.point.startswith("p=")}
        what = (f"{row.prompt}-prompt {row.method} {row.point} within --max-drop {max_drop:g}" if not row.is_reference
                else f"the {row.method}, as no skeleton was within --max-drop {max_drop:g}")
        test_drop = best_test - row.accuracy
        drops.append(100 * test_drop)
        speeds.append(row.speedup_vs_input or 1.0)
        interval, read = drop_interval_on_test(best, row) if row is not best else None, ""
        if interval:
            verdicts.append(_verdict(interval, max_drop))
            read = f"; {CONFIDENCE:.0%} interval {100 * interval[0]:.2f} to {100 * interval[1]:.2f}: {verdicts[-1]}"
        lines.append(f"- seed {row.seed} chose {what}: {speeds[-1]:.2f}x the input-prompt full model's speed, test "
                     f"accuracy {row.accuracy:.4f} ({_below(test_drop)} the best full model's {best_test:.4f}{read}), "
                     f"validation {row.val_accuracy:.4f} ({_below(best_val - row.val_accuracy)} {best_val:.4f}); "
                     f"{len(built)} {method} skeletons built against a grid's {len(LADDER)} per full model searched")
    if len(drops) > 1:
        lines.append(f"- over {len(drops)} seeds: test drop {sum(drops) / len(drops):.2f} points "
                     f"({min(drops):.2f} to {max(drops):.2f}), speed-up {sum(speeds) / len(speeds):.2f}x "
                     f"({min(speeds):.2f} to {max(speeds):.2f})"
                     + (f"; on test, {_tally(verdicts)}" if verdicts else ""))
    budget = (f"accuracy budget (--max-drop {max_drop:g}): the fastest model whose validation accuracy is at most "
              f"{max_drop:g} points below the best full model's; test accuracy reported, never used to choose")
    if verdicts:
        budget += (f". The test drop's {CONFIDENCE:.0%} interval is a paired bootstrap over the test examples: where it "
                   f"spans {max_drop:g} points, the test split is too small to say which side of the budget the "
                   "choice is on")
    return "\n".join(lines) + "\n\n" + budget


def drop_interval_on_test(reference: Row, row: Row) -> tuple[float, float] | None:
    """The CONFIDENCE interval of row's test drop below `reference` (skeleton.evaluate.drop_interval, a ratio), from
    the test logits each model was judged on; None when either has none."""
    if not (reference.logits and row.logits and row.data):
        return None
    from safetensors.torch import load_file

    from skeleton.evaluate import drop_interval
    from skeleton.stages import load_data

    labels = load_data(row.data)[0]["test"]["label"]
    return drop_interval(labels, load_file(reference.logits)["logits"], load_file(row.logits)["logits"], CONFIDENCE)


WITHIN, OVER, UNRESOLVED = "within the budget", "over the budget", "the test split cannot tell"


def _verdict(interval: tuple[float, float], max_drop: float) -> str:
    low, high = (100 * end for end in interval)
    return WITHIN if high <= max_drop else OVER if low > max_drop else UNRESOLVED


def _tally(verdicts: list[str]) -> str:
    return ", ".join(f"{verdicts.count(v)} {v}" for v in (WITHIN, UNRESOLVED, OVER) if v in verdicts)


def _below(drop: float) -> str:
    """An accuracy difference (a ratio) in points: a skeleton can beat the full model it was cut from."""
    return f"{100 * drop:.2f} points below" if drop >= 0 else f"{-100 * drop:.2f} points above"
