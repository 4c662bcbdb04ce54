"""Select task neurons, cut the rest out of the FFN weights, and export / load skeletons.

A skeleton folder:
    backbone/        standard transformers checkpoint, smaller intermediate_size (stock AutoModel loads it)
    adapter/         prompt + head (adapter_config.json, adapter_model.safetensors)
    neurons.json     kept neuron indices per layer, into the original model's FFN
    manifest.json    sha256 of every file, checked on load
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from skeleton.backbones import family_of
from skeleton.io import atomic_dir, file_sha256
from skeleton.model import PromptClassifier

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """A skeleton folder that is missing files or whose files do not match their recorded checksums."""


def check_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate!r}; e.g. 0.65 removes 65% of FFN neurons")
    return float(rate)


def kept_width(width: int, rate: float, multiple: int = 8) -> int:
    """(1 - rate) * width rounded to a multiple of 8 (kernel-friendly), at least 8, at most width."""
    keep = round((1.0 - check_rate(rate)) * width / multiple) * multiple
    return min(width, max(multiple, keep))


def select(scores: list[torch.Tensor], rate: float) -> list[torch.Tensor]:
    """Per layer, the sorted indices of the top-scoring neurons; the same kept width in every layer."""
    keep = kept_width(len(scores[0]), rate)
    return [torch.sort(torch.topk(s, keep).indices).values for s in scores]


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, index).clone(), requires_grad=False)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=False)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def slice_ffn(backbone: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """Physically remove every FFN neuron not in `keep` (in place); returns the backbone."""
    blocks = family_of(backbone).ffn_blocks(backbone)
    if len(keep) != len(blocks) or len({len(k) for k in keep}) != 1:
        raise ValueError("keep needs one index tensor per FFN layer, all of the same length")
    for block, index in zip(blocks, keep):
        for up in block.up:
            _slice_linear(up, index, 0)
        _slice_linear(block.down, index, 1)
    backbone.config.intermediate_size = len(keep[0])
    return backbone


@torch.no_grad()
def mask_ffn(backbone: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """Zero the down-projection columns of removed neurons (in place): the test oracle for slicing."""
    for block, index in zip(family_of(backbone).ffn_blocks(backbone), keep):
        dropped = torch.ones(block.down.in_features, dtype=torch.bool)
        dropped[index] = False
        block.down.weight[:, dropped] = 0.0
    return backbone


def export_skeleton(model: PromptClassifier, tokenizer, keep: list[torch.Tensor], folder: str | Path, meta: dict) -> Path:
    """Write a skeleton folder atomically: it appears whole or not at all."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.backbone.save_pretrained(tmp / "backbone")
        tokenizer.save_pretrained(tmp / "backbone")
        model.save_adapter(tmp / "adapter")
        (tmp / "neurons.json").write_text(json.dumps({"keep": [k.tolist() for k in keep], **meta}))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): file_sha256(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def verify(folder: str | Path) -> dict:
    """Check every file against the manifest; raise ArtifactError naming the first bad one and the fix."""
    folder = Path(folder)
    fix = f"delete {folder} and re-run the sweep to rebuild it"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{folder} is not a complete skeleton ({MANIFEST} unreadable: {e}); {fix}") from None
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise ArtifactError(f"skeleton file {path} is missing or corrupt (checksum mismatch); {fix}")
    return manifest


def load_skeleton(folder: str | Path):
    """(PromptClassifier, tokenizer, neurons record) from a verified skeleton folder."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    verify(folder)
    backbone = AutoModel.from_pretrained(folder / "backbone", dtype="float32", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "backbone", local_files_only=True)
    model = PromptClassifier.from_adapter(backbone, folder / "adapter").eval()
    return model, tokenizer, json.loads((folder / "neurons.json").read_text())
