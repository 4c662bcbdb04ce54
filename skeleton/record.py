"""A skeleton's metadata record, `neurons.json`: its one writer, its one reader, and the one name it gives.

    {"keep": [[neuron, ...] per FFN layer],   indices into the original model's FFN neurons
     "heads": [[head, ...] per layer],        only when heads were pruned: indices into the original heads
     **meta}                                  rate, kept_width(s), head_rate, allocation, reconstruct, tune_norms,
                                              method, task, backbone, max_length, and the training record

`read_meta` is what everything but the pruning code wants: the record without the index lists, with the kept
width (and head count) per layer, and the selection method even for skeletons exported before it was recorded.
"""
from __future__ import annotations

import json
from pathlib import Path

NEURONS = "neurons.json"


def write_record(folder: str | Path, keep: list[list[int]], heads: list[list[int]] | None, meta: dict) -> None:
    record = {"keep": keep, **({"heads": heads} if heads else {}), **meta}
    (Path(folder) / NEURONS).write_text(json.dumps(record))


def read_record(folder: str | Path) -> dict:
    """The whole record, index lists included."""
    return json.loads((Path(folder) / NEURONS).read_text())


def read_meta(folder: str | Path) -> dict:
    """The record without the index lists, plus kept_widths (and kept_heads) per layer and the method."""
    record = read_record(folder)
    keep, heads = record.pop("keep"), record.pop("heads", None)
    counts = {"kept_widths": [len(k) for k in keep], **({"kept_heads": [len(h) for h in heads]} if heads else {})}
    return {**record, **counts, "method": record.get("method") or method_of(record.get("scores"))}


def method_of(scores: str | None) -> str | None:
    """The selection method that made a scores file, from the scores.json written beside it."""
    made_by = Path(scores).with_name("scores.json") if scores else None
    return json.loads(made_by.read_text()).get("method") if made_by and made_by.is_file() else None


def skeleton_name(meta: dict, folder: str | Path | None = None) -> str:
    """<task>-<method>-p<rate> (the full model's method is "full", a fine-tuned one's "finetuned"), then
    -<prompt method>, -h<head rate>, -<allocation>, -rec (reconstructed) and -norms (normalisation layers tuned)
    where they are not the defaults. Without a recorded task (skeletons exported before it was) the folder's name."""
    if not meta.get("task") and folder is not None:
        return Path(folder).name
    rate = float(meta.get("rate", 0.0))
    method = meta.get("method") or (("finetuned" if meta.get("finetune") else "full") if rate == 0.0 else None)
    parts = [*([meta["task"]] if meta.get("task") else []), *([method] if method else []), f"p{rate}"]
    if meta.get("prompt_method", "input") != "input":
        parts.append(meta["prompt_method"])
    if meta.get("head_rate"):
        parts.append(f"h{float(meta['head_rate'])}")
    if meta.get("allocation", "uniform") != "uniform":
        parts.append(meta["allocation"])
    if meta.get("reconstruct"):
        parts.append("rec")
    if meta.get("tune_norms"):
        parts.append("norms")
    return "-".join(parts)
