"""Benchmark-regression rules: compare tonight's measurements of the reference skeletons with the baseline."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    speedup_drop: float = 0.10  # relative: a speed-up 10% below the baseline's is a regression
    accuracy_drop: float = 0.01  # absolute: 1 point of test accuracy

    def __post_init__(self):
        if not (0 <= self.speedup_drop < 1 and 0 <= self.accuracy_drop < 1):
            raise ValueError(f"thresholds must be in [0, 1): {self}")


def regressions(baseline: list[dict], measured: list[dict], thresholds: Thresholds) -> list[str]:
    """One message per (rate, metric) that fell past its threshold; points are matched by rate."""
    found = []
    tonight = {point["rate"]: point for point in measured}
    for ref in baseline:
        now = tonight.get(ref["rate"])
        if now is None:
            found.append(f"rate {ref['rate']}: no measurement tonight")
            continue
        if now["speedup"] < ref["speedup"] * (1 - thresholds.speedup_drop):
            found.append(f"speedup at rate {ref['rate']}: {now['speedup']:.3f}x vs baseline {ref['speedup']:.3f}x "
                         f"(allowed drop {thresholds.speedup_drop:.0%})")
        if now["accuracy"] < ref["accuracy"] - thresholds.accuracy_drop:
            found.append(f"accuracy at rate {ref['rate']}: {now['accuracy']:.4f} vs baseline {ref['accuracy']:.4f} "
                         f"(allowed drop {thresholds.accuracy_drop:.4f})")
    return found
