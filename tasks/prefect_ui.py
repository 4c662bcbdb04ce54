"""Results in the Prefect UI: artifacts on the flow run, so a user who starts a deployment sees what it found.

A sweep carries a progress artifact (updated as points finish), a table artifact (the results table) and a
Markdown artifact (--max-drop's choice, headline figures and the MLflow links); a nightly run carries its verdict
as Markdown and its measurements as a table. Keys (lowercase, digits, dashes) put them on the Artifacts page;
reusing a key adds a version, so each task's latest sweep is one click away.
"""
from __future__ import annotations

import re
from uuid import UUID

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

TABLE_COLUMNS = ("prompt", "method", "point", "rate", "head_rate", "seeds", "chosen", "accuracy", "accuracy_std",
                 "val_accuracy", "macro_f1", "speedup", "speedup_bound", "speedup_vs_input", "parameters", "kept_width")


def key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:100]


def run_links(run_id: str) -> str:
    """The run's MLflow UI pages (tasks.tracking.ui_pages) as Markdown links, and how to start a local store's UI."""
    from tasks.tracking import ui_base, ui_pages

    base, start = ui_base()
    links = " · ".join(f"[{label}]({base}/{page})" for label, page in ui_pages(run_id).items())
    return f"MLflow: {links}" + (f" (start the UI first: `{start}`)" if start else "")


def sweep_progress(task_name: str, total: int) -> UUID:
    return create_progress_artifact(0.0, key=key("sweep", task_name, "progress"),
                                    description=f"sweep points finished (of {total}) for {task_name}")


def point_finished(artifact_id: UUID, done: int, total: int) -> None:
    update_progress_artifact(artifact_id, 100.0 * done / max(total, 1))


def _cell(value):
    """A JSON-able table cell: NaN and pandas' NA empty, numpy scalars plain, floats rounded."""
    try:
        if value is None or value != value:
            return None
    except TypeError:  # pd.NA cannot be compared
        return None
    value = value.item() if hasattr(value, "item") else value
    return round(value, 4) if isinstance(value, float) else value


def sweep_results(task_name: str, summary: list[dict], run_id: str, report: str = "") -> None:
    """The results table, and the headline: --max-drop's `report` (flows.search.describe) and the MLflow links
    first, then the full model, linear probe, each skeleton's accuracy and speed-up."""
    from tasks.results import FULLS, PROBE, Row, main_full

    table = [{c: _cell(row.get(c)) for c in TABLE_COLUMNS} for row in summary]
    create_table_artifact(table, key=key("sweep", task_name, "results"),
                          description=f"Sweep results for {task_name} (means over seeds)")
    rows = [Row.of(row) for row in summary]
    by_method = {row.method: row for row in rows}
    full = main_full(rows)
    lines = [f"# Sweep: {task_name}", "", *([report, ""] if report else []), run_links(run_id), ""]
    lines += [f"- {row.method}: accuracy **{row.accuracy:.4f}**" for row in rows
              if row.is_reference and row.method != PROBE]
    lines += [f"- linear probe: accuracy {by_method[PROBE].accuracy:.4f}" if PROBE in by_method else "", ""]
    lines += [f"| skeleton | accuracy | vs its full model | speed-up over it | speed-up over {full.method} |",
              "|---|---|---|---|---|"]
    for row in rows:
        if row.is_reference:
            continue
        own = by_method.get(FULLS.get(row.prompt), full)
        chosen = "**chosen** " if row.chosen else ""  # --max-drop's choice, of one seed at least
        lines.append(f"| {chosen}{row.prompt} {row.method} {row.point} | {row.accuracy:.4f} | "
                     f"{100 * (row.accuracy - own.accuracy):+.1f} pts | {row.speedup:.2f}x | "
                     + (f"{row.speedup_vs_input:.2f}x |" if row.speedup_vs_input is not None else "- |"))
    create_markdown_artifact("\n".join(lines), key=key("sweep", task_name, "summary"),
                             description=f"Sweep headline for {task_name}")


def nightly_verdict(measured: list[dict], found: list[str], run_id: str) -> None:
    verdict = "REGRESSION" if found else "PASS"
    lines = [f"# Nightly benchmark: {verdict}", ""]
    lines += [f"- {message}" for message in found] or ["No metric fell past its threshold."]
    lines += ["", "| rate | speed-up | accuracy | bound ratio |", "|---|---|---|---|"]
    lines += [f"| {m['rate']} | {m['speedup']:.3f}x | {m['accuracy']:.4f} | {m['bound_ratio']:.3f} |" for m in measured]
    lines += ["", run_links(run_id)]
    create_markdown_artifact("\n".join(lines), key="nightly-verdict", description=f"Nightly benchmark: {verdict}")
    create_table_artifact([{k: _cell(v) for k, v in m.items()} for m in measured], key="nightly-measurements",
                          description="Tonight's measurements of the reference skeletons")
