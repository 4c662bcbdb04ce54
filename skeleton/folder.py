"""A skeleton folder, the one type that knows its layout: it writes it, checks it, reads it and names it.

    backbone/        transformers checkpoint (and tokenizer). The same FFN width in every layer and all heads kept:
                     a standard checkpoint with a smaller intermediate_size (stock AutoModel loads it). Per-layer
                     widths or pruned heads: model_type "skeleton_bert" with `per_layer_config`
                     (skeleton/skeleton_bert.py; `register()` it, or load with SkeletonFolder.load)
    adapter/         prompt + head, as PromptClassifier.save_adapter writes them (skeleton/model.py)
    neurons.json     {"keep": [[neuron, ...] per FFN layer],   indices into the original model's FFN neurons
                      "heads": [[head, ...] per layer],        only when heads were pruned: into the original heads
                      **meta}                                  rate, kept_width(s), head_rate, allocation, reconstruct,
                                                               tune_norms, method, task, backbone, max_length, and the
                                                               training record
    + the manifest of every stage folder (skeleton.io): a sha256 per file, checked before loading

    folder = SkeletonFolder.export(model, tokenizer, keep, "artifacts/skeletons/x", meta)   # whole or not at all
    model, tokenizer, record = folder.load()
    folder.meta(), folder.name(), folder.verify(), SkeletonFolder.find(["artifacts/skeletons"])

`model_name` names a model from how it was made, in each form the project shows it. Plain Python at import time:
torch and transformers load when a model is exported or loaded.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from skeleton.io import MANIFEST, ArtifactError, atomic_dir, file_sha256, verify_dir  # noqa: F401 (re-exported)

BACKBONE, ADAPTER, NEURONS = "backbone", "adapter", "neurons.json"
SCORES_RECORD = "scores.json"  # beside an attribution's scores.parquet: how the scores were made
FIX = ("re-run the sweep that made it: its cache checks every folder before reuse and rebuilds a missing or damaged "
       "one (a copy elsewhere: copy it again from its source)")


@dataclass(frozen=True)
class SkeletonFolder:
    """A skeleton folder (see the module doc). It stands for its path: str(), os.fspath() and `/` work on it."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def backbone(self) -> Path:
        """The transformers checkpoint and tokenizer."""
        return self.path / BACKBONE

    @property
    def adapter(self) -> Path:
        """The prompt and head (PromptClassifier.from_adapter reads it)."""
        return self.path / ADAPTER

    @classmethod
    def export(cls, model, tokenizer, keep: list, path: str | os.PathLike, meta: dict,
               heads: list | None = None) -> SkeletonFolder:
        """Write `model` (a PromptClassifier, sliced to `keep`: kept FFN neuron indices per layer, and `heads`: kept
        head indices per layer when heads were pruned) with its tokenizer and meta, atomically. A model on a GPU is
        moved to the CPU first (in place): a folder loads on any machine."""
        from skeleton.backbones import family_of

        model = model.cpu()
        with atomic_dir(path) as tmp:
            family_of(model.backbone).checkpoint_model(model.backbone).save_pretrained(tmp / BACKBONE)
            tokenizer.save_pretrained(tmp / BACKBONE)
            model.save_adapter(tmp / ADAPTER)
            heads = [h.tolist() for h in heads] if heads else None
            (tmp / NEURONS).write_text(json.dumps(neurons_record([k.tolist() for k in keep], heads, meta)))
        return cls(path)  # atomic_dir added the manifest

    @classmethod
    def find(cls, paths: Iterable[str | os.PathLike]) -> list[SkeletonFolder]:
        """The skeleton folders among `paths`: each path is a skeleton folder or a folder of them (one level down)."""
        found = []
        for path in map(Path, paths):
            if (path / NEURONS).is_file():
                found.append(cls(path))
            elif path.is_dir():
                found += [cls(p) for p in sorted(path.iterdir())
                          if not p.name.startswith(".") and (p / NEURONS).is_file()]
        return found

    def exists(self) -> bool:
        """Whether it was written: atomically, so whole (a damaged one: `verify` says so)."""
        return (self.path / MANIFEST).is_file()

    def verify(self) -> dict:
        """Every file against the manifest; ArtifactError naming the first bad one and the fix. Returns the manifest."""
        return verify_dir(self.path, "skeleton", fix=FIX)

    def digest(self) -> str:
        """The sha256 of its manifest: the identity of its content (MLflow's tag skeleton.manifest)."""
        return file_sha256(self.path / MANIFEST)

    def record(self) -> dict:
        """neurons.json whole: the index lists and the meta."""
        return json.loads((self.path / NEURONS).read_text())

    def meta(self) -> dict:
        """The record without the index lists, with the kept width (and head count) per layer, and the selection
        method even for skeletons exported before it was recorded."""
        record = self.record()
        keep, heads = record.pop("keep"), record.pop("heads", None)
        counts = {"kept_widths": [len(k) for k in keep], **({"kept_heads": [len(h) for h in heads]} if heads else {})}
        return {**record, **counts, "method": record.get("method") or method_of(record.get("scores"))}

    def name(self) -> str:
        """Its expert name (model_name), e.g. rotten_tomatoes-grad_x_act-p0.65."""
        return model_name(self.meta(), self.path)

    def config(self) -> dict:
        """The backbone's config.json."""
        return json.loads((self.backbone / "config.json").read_text())

    def sizes(self) -> dict:
        """MiB on disk: the backbone's weight files, and the whole folder (tokenizer, adapter, records too)."""
        files = [p for p in self.path.rglob("*") if p.is_file()]
        weights = [p for p in files if p.parent == self.backbone and p.suffix in (".safetensors", ".bin")]
        return {"backbone_mb": sum(p.stat().st_size for p in weights) / 2**20,
                "total_mb": sum(p.stat().st_size for p in files) / 2**20}

    def load(self):
        """(PromptClassifier, tokenizer padded as the model expects, neurons record), after checking every file against
        the manifest. Either checkpoint kind loads: the "skeleton_bert" classes are registered with transformers'
        Auto classes first."""
        from transformers import AutoModel, AutoTokenizer

        from skeleton.backbones import set_padding
        from skeleton.model import PromptClassifier
        from skeleton.skeleton_bert import register

        self.verify()
        register()
        backbone = AutoModel.from_pretrained(self.backbone, dtype="float32", local_files_only=True)
        tokenizer = set_padding(AutoTokenizer.from_pretrained(self.backbone, local_files_only=True))
        model = PromptClassifier.from_adapter(backbone, self.adapter).eval()
        return model, tokenizer, self.record()


def neurons_record(keep: list[list[int]], heads: list[list[int]] | None, meta: dict) -> dict:
    """What neurons.json holds: the kept indices per layer (heads only when pruned), then the meta."""
    return {"keep": keep, **({"heads": heads} if heads else {}), **meta}


def method_of(scores: str | None) -> str | None:
    """The selection method that made a scores file, from the scores.json written beside it."""
    made_by = Path(scores).with_name(SCORES_RECORD) if scores else None
    return json.loads(made_by.read_text()).get("method") if made_by and made_by.is_file() else None


def model_name(meta: Mapping, folder: str | os.PathLike | None = None, style: str = "expert") -> str:
    """A model's name from how it was made: a skeleton's meta, or a results row's (tasks/results.py Row.meta). A
    full model is one with rate 0 and no selection method ("full", fine-tuned: "finetuned").

      "expert"  <task>-<method>-p<rate>, then -<prompt method>, -h<head rate>, -<allocation>, -rec (reconstructed)
                and -norms (normalisation layers tuned) where they are not the defaults; without a recorded task
                (skeletons exported before it was), `folder`'s name. Served experts, MLflow run names.
      "label"   [<prompt method> ]<method> p=<rate>[ h=<head rate>]; "full", "full (<prompt method>)", "fine-tuned";
                with no rate in `meta`, the method's label alone. Benchmark reports, plots.
      "slug"    [<prompt method>-]<method>-p<rate %>[-h<head rate %>]; "full", "prefix-full", "finetuned"; no dots.
                MLflow model names, registry aliases (meta of a rate alone: "p50").
    """
    rate = None if meta.get("rate") is None else float(meta["rate"])
    head_rate = float(meta.get("head_rate") or 0.0)
    prompt = meta.get("prompt_method") or "input"
    method = meta.get("method")
    made = "finetuned" if meta.get("finetune") else "full"
    if style == "expert":
        if not meta.get("task") and folder is not None:
            return Path(folder).name
        method = method or (made if not rate else None)
        parts = [*([meta["task"]] if meta.get("task") else []), *([method] if method else []), f"p{rate or 0.0}"]
        parts += [prompt] if prompt != "input" else []
        parts += [f"h{head_rate}"] if head_rate else []
        parts += [meta["allocation"]] if meta.get("allocation", "uniform") != "uniform" else []
        parts += ["rec"] * bool(meta.get("reconstruct")) + ["norms"] * bool(meta.get("tune_norms"))
        return "-".join(parts)
    full = rate == 0.0 and not head_rate and method in (None, "full", "finetuned")
    if style == "label":
        if full:
            return "fine-tuned" if made == "finetuned" else "full" if prompt == "input" else f"full ({prompt})"
        label = " ".join([*([prompt] if prompt != "input" else []),
                          str(method or (Path(folder).name if folder is not None else "skeleton"))])
        return label + (f" p={rate:.3g}" if rate is not None else "") + (f" h={head_rate:.3g}" if head_rate else "")
    if style == "slug":
        parts = [*([prompt] if prompt != "input" else [])]
        parts += [made] if full else [*([method] if method else []), f"p{(rate or 0.0) * 100:.4g}",
                                      *([f"h{head_rate * 100:.4g}"] if head_rate else [])]
        return "-".join(parts).replace(".", "_")
    raise ValueError(f"unknown name style {style!r}; known: expert, label, slug")
