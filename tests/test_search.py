"""--max-drop's search (flows/search.py): bisection over the ladder of rates, the choice per seed, bad budgets.
The flow's search end to end on a tiny model: tests/test_flow.py."""
import math
import re

import pytest
import torch

from flows.search import LADDER, check_max_drop, choose, choose_per_seed, describe, next_rate
from tasks.results import FULL, FULL_PREFIX, Row


def search(passes, tried=None) -> tuple[dict[float, bool], list[float]]:
    """Run the bisection against `passes(rate)`: (every rate tried and whether it passed, the rates built)."""
    tried, built = dict(tried or {}), []
    while (rate := next_rate(tried)) is not None:
        assert rate not in tried and rate in LADDER
        tried[rate] = passes(rate)
        built.append(rate)
    return tried, built


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 0.5, 0.62, 0.8, 0.95, 1.0])
def test_bisection_finds_the_highest_passing_rate_in_a_few_builds(threshold):
    tried, built = search(lambda rate: rate <= threshold)
    highest = max((r for r in LADDER if r <= threshold), default=None)
    assert max((r for r, ok in tried.items() if ok), default=None) == highest
    assert len(built) <= math.ceil(math.log2(len(LADDER) + 1)) < len(LADDER)


def test_the_grid_points_count_as_probes_already_made():
    grid = {0.5: True, 0.65: True, 0.8: True}
    tried, built = search(lambda rate: rate <= 0.85, grid)
    assert built == [0.9, 0.85]  # above the highest passing grid rate only
    # Not monotone (re-tuning is noisy): the search still ends, above the highest rate that passed.
    tried, built = search(lambda rate: rate <= 0.85, {0.5: True, 0.65: False, 0.8: True})
    assert built == [0.9, 0.85] and max(r for r, ok in tried.items() if ok) == 0.85


def rows(*points, seed=0):
    """Two full models (input val 0.80, prefix val 0.82, 1.1x) and skeletons (prompt, rate, val, test, speed-up)."""
    fulls = [Row(seed=seed, prompt="input", method=FULL, val_accuracy=0.80, accuracy=0.78, speedup_vs_input=1.0),
             Row(seed=seed, prompt="prefix", method=FULL_PREFIX, val_accuracy=0.82, accuracy=0.79,
                 speedup_vs_input=1.1)]
    return fulls + [Row(seed=seed, prompt=prompt, method="grad_x_act", point=f"p={rate:g} h=0", rate=rate,
                        val_accuracy=val, accuracy=test, speedup_vs_input=speed)
                    for prompt, rate, val, test, speed in points]


def test_the_fastest_model_within_the_budget_is_chosen_never_one_over_it():
    seed = rows(("prefix", 0.5, 0.815, 0.78, 1.6), ("prefix", 0.8, 0.811, 0.77, 2.1),
                ("prefix", 0.9, 0.80, 0.70, 2.5), ("input", 0.9, 0.81, 0.76, 2.3))
    chosen, lowest = choose(seed, 1.0)
    assert lowest == pytest.approx(0.81)
    assert (chosen.prompt, chosen.rate) == ("input", 0.9)  # a tie with the floor passes
    for budget in (0.0, 0.5, 1.0, 1.5, 3.0, 100.0):
        chosen, lowest = choose(seed, budget)
        assert chosen.val_accuracy >= lowest - 1e-9
        assert all(r.speedup_vs_input <= chosen.speedup_vs_input for r in seed if r.val_accuracy >= lowest - 1e-9)


def test_no_skeleton_within_the_budget_chooses_the_best_full_model_and_says_so():
    seed = rows(("prefix", 0.5, 0.79, 0.78, 1.6))
    chosen, _ = choose(seed, 0.5)
    assert chosen.method == FULL_PREFIX
    both = seed + rows(("prefix", 0.5, 0.819, 0.785, 1.6), seed=1)
    assert [(r.seed, r.method) for r in choose_per_seed(both, 0.5)] == [(0, FULL_PREFIX), (1, "grad_x_act")]
    report = describe(both, 0.5, "grad_x_act")
    assert "seed 0 chose the full (prefix tuning), as no skeleton was within --max-drop 0.5" in report
    assert "seed 1 chose prefix-prompt grad_x_act p=0.5 h=0 within --max-drop 0.5" in report
    assert "over 2 seeds" in report and report.index("over 2 seeds") < report.index("accuracy budget")


def test_the_frontier_plot_rings_the_choice_and_draws_the_budget(tmp_path, monkeypatch):
    from tasks import report
    from tasks.results import results_table

    seed = rows(("input", 0.5, 0.80, 0.77, 1.4), ("input", 0.8, 0.75, 0.70, 1.9))
    choose_per_seed(seed, 2.0)
    drawn = []
    monkeypatch.setattr(report, "_save", lambda fig, out: drawn.append(fig) or out)
    report.plot_frontier(results_table(seed).to_dict("records"), tmp_path / "frontier.png", max_drop=2.0)
    ax = drawn[0].axes[0]
    handles, labels = ax.get_legend_handles_labels()
    ring = handles[labels.index("chosen (--max-drop)")]
    assert ring.get_offsets().tolist() == [[1.4, 0.77]]  # the p=0.5 skeleton: the p=0.8 one is over the budget
    budget = handles[labels.index("--max-drop 2: best full model - 2 pts")]
    assert budget.get_ydata()[0] == pytest.approx(0.79 - 0.02)  # below the best full model's test accuracy


@pytest.mark.parametrize("bad", [-0.5, float("nan"), 100.5])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="max_drop must be a number of accuracy points from 0 to 100"):
        check_max_drop(bad)
    assert check_max_drop(None) is None and check_max_drop(0.0) == 0.0


def test_the_drop_interval_is_paired_and_brackets_the_drop():
    from skeleton.evaluate import drop_interval

    gold = torch.arange(2000) % 2

    def answers(wrong):  # one-hot logits, wrong on the examples `wrong`
        pred = gold.clone()
        pred[wrong] = 1 - pred[wrong]
        return torch.nn.functional.one_hot(pred, 2).float()

    assert drop_interval(gold, answers(slice(0, 300)), answers(slice(0, 300))) == (0.0, 0.0)
    # Both wrong on the same 300 examples, the model on 100 more: a 5-point drop, read from those 100 alone.
    low, high = drop_interval(gold, answers(slice(0, 300)), answers(slice(0, 400)))
    assert 0.04 < low < 0.05 < high < 0.06
    # The same accuracies with errors on other examples: the interval is much wider.
    apart_low, apart_high = drop_interval(gold, answers(slice(0, 300)), answers(slice(1600, 2000)))
    assert apart_low < 0.05 < apart_high and apart_high - apart_low > 2 * (high - low)
    assert drop_interval(gold, answers(slice(0, 400)), answers(slice(0, 300)))[1] < 0  # the model is better


def test_the_report_reads_each_test_drop_against_the_budget_with_its_interval(tmp_path):
    """Each seed's test drop with its interval, from the test logits the models were judged on: within the budget,
    over it, or too close to tell on a split this size."""
    from datasets import Dataset, DatasetDict
    from safetensors.torch import save_file

    from skeleton.stages import INFO

    gold = torch.arange(2000) % 2
    DatasetDict({"test": Dataset.from_dict({"label": gold.tolist()})}).save_to_disk(str(tmp_path / "tokenized"))
    (tmp_path / INFO).write_text("{}")

    def judged(row, wrong):  # the row, judged on logits wrong on its first `wrong` test examples
        pred = gold.clone()
        pred[:wrong] = 1 - pred[:wrong]
        row.logits = str(tmp_path / f"{row.seed}-{row.method}.safetensors")
        save_file({"logits": torch.nn.functional.one_hot(pred, 2).float()}, row.logits)
        row.accuracy, row.data = 1 - wrong / 2000, str(tmp_path)
        return row

    seeds = []
    for seed, extra in ((0, 4), (1, 60), (2, 20)):  # 0.2, 3 and 1 point below the best full model
        full, prefix, skeleton = rows(("prefix", 0.5, 0.815, 0.0, 2.0), seed=seed)
        seeds += [judged(full, 500), judged(prefix, 420), judged(skeleton, 420 + extra)]
    choose_per_seed(seeds, 1.0)
    report = describe(seeds, 1.0, "grad_x_act")
    for seed, drop, verdict in ((0, 0.2, "within the budget"), (1, 3.0, "over the budget"),
                                (2, 1.0, "the test split cannot tell")):
        line = next(line for line in report.splitlines() if line.startswith(f"- seed {seed} chose prefix-prompt"))
        low, high = map(float, re.search(r"90% interval (-?[\d.]+) to (-?[\d.]+): ", line).groups())
        assert f"{drop:.2f} points below the best full model's 0.7900" in line and low < drop < high
        assert f"interval {low:.2f} to {high:.2f}: {verdict})" in line
    assert "on test, 1 within the budget, 1 the test split cannot tell, 1 over the budget" in report
    assert "paired bootstrap over the test examples" in report
