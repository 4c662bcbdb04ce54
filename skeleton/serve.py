"""Unplug and play: one backbone in memory, many task experts, switched per request.

An expert is what a skeleton adds to the backbone it was cut from: the kept FFN neurons per layer (indices into
the original FFN, from neurons.json; widths may differ per layer), the kept attention heads if heads were pruned,
its adapter (prompt + head), and the weights it changed: a reconstructed skeleton's refit down projections, the
normalisation layers of one whose meta says tune_norms (trained in re-tuning, or in the full model it was cut
from). To answer a request for a task, the server plugs that task's expert in -- each FFN block's up/down linears
(and attention projections) get weights index-selected from the in-memory backbone, the changed weights are
swapped in -- runs the small network, and puts the original weights back. The backbone is never re-read from disk.

    server = SkeletonServer.load("minilm")
    server.add("artifacts/skeletons/429c299c193c")          # named <task>-<method>-p<rate> from its neurons.json
    server.classify("rotten_tomatoes-grad_x_act-p0.5", ["a gripping film"])   # -> [Prediction(label=..., ...)]
    server.serve([("task-a", "text 1"), ("task-b", "text 2")])               # grouped by task, request order

The outputs equal those of the exported skeleton (same weights, same shapes, same kernels). An expert whose
exported backbone is not an index-selection of this backbone is refused at `add`, with the reason.
"""
from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from skeleton.backbones import attention_blocks, family_of, load_backbone, norm_parameters
from skeleton.folder import MANIFEST, ArtifactError, read_meta, read_record, verify
from skeleton.folder import skeleton_name as default_name  # noqa: F401 (re-exported)
from skeleton.model import PromptClassifier
from skeleton.registry import Registry

DEFAULT_MAX_LENGTH = 64  # truncation when the skeleton does not record the max_length it was trained with
# Config fields an expert may differ in from its backbone: pruned shapes (the tensors' shapes are checked instead),
# the checkpoint class of a family (model_type, checked against the family) and bookkeeping.
CONFIG_IGNORED = {"intermediate_size", "per_layer_config", "model_type", "_name_or_path", "transformers_version",
                  "architectures", "dtype", "torch_dtype", "id2label", "label2id"}


class ExpertMismatchError(ValueError):
    """A skeleton that is not an expert of the loaded backbone: its weights are not a slice of the backbone's."""


def find_skeletons(paths: Iterable[str | Path]) -> list[Path]:
    """Skeleton folders among `paths`: each path is a skeleton folder or a folder of them (one level down)."""
    found = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())
    return found


def held_bytes(*objects: nn.Module | torch.Tensor) -> int:
    """Bytes of the distinct tensor storages held by modules (parameters and buffers) and tensors."""
    seen: dict[tuple, int] = {}
    for obj in objects:
        tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else [obj]
        for t in tensors:
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class _Slot(NamedTuple):
    linear: nn.Linear
    dim: int  # 0: the kept units are output rows (FFN up, attention q/k/v); 1: input columns (down, attention out)
    weight: nn.Parameter  # the backbone's own, put back on restore
    bias: nn.Parameter | None


@dataclass
class Prediction:
    task: str
    label: str
    probabilities: dict[str, float]  # label -> probability, in the head's label order


@dataclass
class Expert:
    name: str
    folder: Path
    keep: list[torch.Tensor]  # per FFN layer, indices into the backbone's neurons (widths may differ per layer)
    heads: list[torch.Tensor] | None  # per layer, kept attention heads; None: all
    model: PromptClassifier  # shares the server's backbone; its prompt and head are the expert's own
    # backbone parameters (by state-dict name) the skeleton changed, so its own, not a slice: refit down
    # projections (reconstructed), normalisation layers (tune_norms)
    own: dict[str, nn.Parameter]
    max_length: int
    meta: dict
    slices: list | None = field(default=None, repr=False)  # pre-sliced weights when the server caches them

    @property
    def labels(self) -> list[str]:
        names = self.model.config.label_names
        return list(names) if names else [str(i) for i in range(self.model.config.num_labels)]


class SkeletonServer:
    """One backbone (the original, full model) and any number of task experts plugged in on demand.

    cache_slices=False keeps only index lists per expert and slices on every plug (least memory);
    cache_slices=True keeps each expert's sliced weights, so a switch is pointer swaps (more memory)."""

    def __init__(self, backbone: nn.Module, tokenizer, source: str = "backbone", cache_slices: bool = False):
        self.backbone = backbone.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.source = source
        self.cache_slices = cache_slices
        self.experts: Registry[Expert] = Registry("task expert")
        self.family = family_of(backbone)
        # Per layer, the linears an expert slices, with their original weights: FFN neurons are rows of "up" and
        # columns of "down"; attention heads (families that know them) rows of q/k/v, columns of the output.
        self._ffn = [[_Slot(up, 0, up.weight, up.bias) for up in block.up]
                     + [_Slot(block.down, 1, block.down.weight, block.down.bias)]
                     for block in self.family.ffn_blocks(backbone)]
        self._attention = attention_blocks(backbone)
        self._heads = [block.num_heads for block in self._attention]
        self._attn = [[_Slot(linear, 0, linear.weight, linear.bias) for linear in block.qkv]
                      + [_Slot(block.out, 1, block.out.weight, block.out.bias)] for block in self._attention]
        # Every parameter by state-dict name: (module, attribute, original), where an expert's own ones go and what
        # comes back on restore.
        self._holders = {f"{prefix}.{attribute}" if prefix else attribute: (module, attribute, parameter)
                         for prefix, module in backbone.named_modules()
                         for attribute, parameter in module.named_parameters(recurse=False)}
        self._names = {id(parameter): name for name, (_, _, parameter) in self._holders.items()}
        self._overridden: list[str] = []
        self._lock = threading.RLock()
        self.active: str | None = None

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", cache_slices: bool = False):
        backbone, tokenizer = load_backbone(name_or_path)
        return cls(backbone.to(device), tokenizer, source=name_or_path, cache_slices=cache_slices)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def names(self) -> list[str]:
        return self.experts.names()

    # ---- loading experts ----------------------------------------------------------------------------------

    def add(self, folder: str | Path, name: str | None = None) -> str:
        """Verify a skeleton folder, check it was cut from this backbone, and keep its expert. Returns its name."""
        with self._lock:  # the checks read the full weights: never while another thread has an expert plugged
            return self._add(Path(folder), name)

    def _add(self, folder: Path, name: str | None) -> str:
        if self.active is not None:
            raise RuntimeError(f"cannot add an expert while {self.active!r} is plugged in")
        label = name or folder.name
        try:
            verify(folder)
        except ArtifactError as e:
            raise ArtifactError(f"expert {label!r}: {e}") from None
        record, meta = read_record(folder), read_meta(folder)
        name = name or default_name(meta, folder)
        if name in self.experts:
            raise ValueError(f"an expert named {name!r} is already loaded (from {self.experts[name].folder}); "
                             "pass a different name")
        keep = self._check_index(name, folder, "neuron", record["keep"], [s[-1].weight.shape[1] for s in self._ffn])
        heads = None
        if record.get("heads"):
            if not self._attention:
                raise ExpertMismatchError(f"expert {name!r} ({folder}) prunes attention heads, which the "
                                          f"{type(self.family).__name__} cannot plug in")
            heads = self._check_index(name, folder, "head", record["heads"], self._heads)
        model = PromptClassifier.from_adapter(self.backbone, folder / "adapter").to(self.device).eval()
        expert = Expert(name, folder, keep, heads, model, {}, int(meta.get("max_length") or DEFAULT_MAX_LENGTH),
                        meta)
        self._check_backbone(expert)
        if self.cache_slices:
            expert.slices = self._slice(expert)
        self.experts.register(name)(expert)
        return name

    def _check_index(self, name: str, folder: Path, unit: str, lists: list[list[int]],
                     widths: list[int]) -> list[torch.Tensor]:
        if len(lists) != len(widths):
            raise ExpertMismatchError(f"expert {name!r} ({folder}) has {unit} indices for {len(lists)} layers, the "
                                      f"backbone {self.source!r} has {len(widths)}: it is not an expert of it")
        out = []
        for i, (index, width) in enumerate(zip(lists, widths)):
            t = torch.tensor(index, dtype=torch.long)
            if len(t) == 0 or t.min() < 0 or t.max() >= width or len(t.unique()) != len(t):
                raise ExpertMismatchError(f"expert {name!r} ({folder}): layer {i} keeps invalid {unit} indices "
                                          f"(empty, repeated or outside 0..{width - 1} of backbone {self.source!r})")
            out.append(t.to(self.device))
        return out

    def _sliced(self, expert: Expert) -> Iterator[tuple[_Slot, torch.Tensor]]:
        """(slot, indices along slot.dim) of every linear the expert slices."""
        for layer, index in zip(self._ffn, expert.keep):
            for slot in layer:
                yield slot, index
        for layer, block, heads in zip(self._attn, self._attention, expert.heads or []):
            rows = (heads[:, None] * block.head_dim + torch.arange(block.head_dim, device=heads.device)).flatten()
            for slot in layer:
                yield slot, rows

    def _ownable(self, expert: Expert) -> set[str]:
        """Names of the backbone parameters the expert's meta says it changed (reconstruct, tune_norms)."""
        names = set()
        if expert.meta.get("reconstruct"):  # refit down projections: weight, and bias where the family has one
            names |= {self._names[id(t)] for layer in self._ffn for t in (layer[-1].weight, layer[-1].bias)
                      if t is not None}
        if expert.meta.get("tune_norms"):
            names |= set(norm_parameters(self.backbone))
        return names

    @torch.no_grad()
    def _check_backbone(self, expert: Expert) -> None:
        """Every exported tensor must equal the backbone's (sliced ones: index-selected), and the config agree."""
        from transformers import AutoConfig, AutoTokenizer

        def refuse(why: str):
            raise ExpertMismatchError(f"expert {expert.name!r} ({expert.folder}) is not an expert of backbone "
                                      f"{self.source!r}: {why}")

        folder = expert.folder / "backbone"
        theirs = AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()
        ours = self.backbone.config.to_dict()
        if theirs["model_type"] not in self.family.model_types:
            refuse(f"its model_type {theirs['model_type']!r} is not of the {type(self.family).__name__}")
        if "head_dim" in theirs and "head_dim" not in ours:  # explicit in per-layer checkpoints; derived in ours
            ours["head_dim"] = ours["hidden_size"] // ours["num_attention_heads"]
        differ = sorted(k for k in (set(theirs) | set(ours)) - CONFIG_IGNORED if theirs.get(k) != ours.get(k))
        if differ:
            refuse("config differs in " + ", ".join(f"{k} ({theirs.get(k)!r} vs {ours.get(k)!r})" for k in differ[:5]))
        expected = self.backbone.state_dict()  # called unplugged (under the lock): the full weights
        sliced = {}  # state-dict name -> (dim, index) of the slice an expert keeps
        for slot, index in self._sliced(expert):
            sliced[self._names[id(slot.weight)]] = (slot.dim, index)
            if slot.bias is not None and slot.dim == 0:
                sliced[self._names[id(slot.bias)]] = (0, index)
        own = self._ownable(expert)
        seen = set()
        for key, tensor in _exported_tensors(folder):
            if key not in expected:
                refuse(f"it has a tensor {key!r} the backbone does not")
            want = expected[key]
            if key in sliced:
                want = want.index_select(*sliced[key])
            tensor = tensor.to(want.device)
            if tensor.shape != want.shape or tensor.dtype != want.dtype:
                refuse(f"{key} is {tuple(tensor.shape)} {tensor.dtype}, the backbone's "
                       f"{'kept slice ' if key in sliced else ''}is {tuple(want.shape)} {want.dtype}")
            seen.add(key)
            if key in own:  # the expert's own values: no need to match the backbone's
                expert.own[key] = nn.Parameter(tensor, requires_grad=False)
            elif not torch.equal(tensor, want):
                diff = (tensor.float() - want.float()).abs().max().item()
                refuse(f"{key} differs from the backbone's {'kept slice' if key in sliced else 'weights'} "
                       f"(max |diff| {diff:.3g})")
        missing = sorted(set(expected) - seen)
        if missing:
            refuse(f"its checkpoint lacks {', '.join(missing[:5])}")
        # Same tokens in, or the outputs could not match: the exported tokenizer must agree with ours.
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            refuse("its tokenizer has a different vocabulary")

    # ---- plugging ----------------------------------------------------------------------------------------

    def _slice(self, expert: Expert) -> list[tuple]:
        """(linear, weight, bias) for every linear the expert slices, index-selected from the original weights
        (not those it has its own of: _plug puts those in)."""
        out = []
        for slot, index in self._sliced(expert):
            if self._names[id(slot.weight)] in expert.own:
                continue
            weight = nn.Parameter(slot.weight.detach().index_select(slot.dim, index), requires_grad=False)
            bias = slot.bias  # a down / output projection's bias is per output feature: not sliced
            if bias is not None and slot.dim == 0:
                bias = nn.Parameter(bias.detach()[index], requires_grad=False)
            out.append((slot.linear, weight, bias))
        return out

    def _plug(self, expert: Expert) -> None:
        if self.active is not None:
            raise RuntimeError(f"expert {self.active!r} is still plugged in; restore the backbone first")
        slices = expert.slices or self._slice(expert)
        self.active = expert.name
        try:
            for linear, weight, bias in slices:
                linear.weight, linear.bias = weight, bias
            self._overridden = list(expert.own)
            for name, parameter in expert.own.items():
                module, attribute, _ = self._holders[name]
                setattr(module, attribute, parameter)
            for slot in (slot for layer in [*self._ffn, *self._attn] for slot in layer):
                slot.linear.out_features, slot.linear.in_features = slot.linear.weight.shape
            for block, heads in zip(self._attention, expert.heads or []):
                self.family.set_num_heads(block, len(heads))
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        for name in self._overridden:
            module, attribute, original = self._holders[name]
            setattr(module, attribute, original)
        self._overridden = []
        for slot in (slot for layer in [*self._ffn, *self._attn] for slot in layer):
            slot.linear.weight, slot.linear.bias = slot.weight, slot.bias
            slot.linear.out_features, slot.linear.in_features = slot.weight.shape
        for block, heads in zip(self._attention, self._heads):
            self.family.set_num_heads(block, heads)
        self.active = None

    @contextlib.contextmanager
    def plugged(self, name: str) -> Iterator[PromptClassifier]:
        """The expert's classifier running on the small network; the full backbone is back on exit."""
        expert = self.experts[name]
        with self._lock:
            self._plug(expert)
            try:
                yield expert.model
            finally:
                self._restore()

    # ---- inference ---------------------------------------------------------------------------------------

    def encode(self, name: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), (batch, seq): truncated to the expert's max_length, right-padded like
        the training collator."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.experts[name].max_length)
        width = max(len(ids) for ids in enc["input_ids"])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(texts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for i, row in enumerate(enc["input_ids"]):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def logits(self, name: str, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), num_labels) logits of one task's expert, plugged in once for all batches."""
        if not texts:
            return torch.empty(0, self.experts[name].model.config.num_labels)
        batches = [self.encode(name, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        with self.plugged(name) as model:
            return torch.cat([model(ids, mask) for ids, mask in batches]).cpu()

    def classify(self, name: str, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        labels = self.experts[name].labels
        probs = torch.softmax(self.logits(name, texts, batch_size), -1).tolist()
        return [Prediction(name, labels[max(range(len(p)), key=p.__getitem__)], dict(zip(labels, p))) for p in probs]

    def serve(self, requests: Sequence[tuple[str, str]], batch_size: int = 32) -> list[Prediction]:
        """Answer (task, text) requests: grouped by task (one plug per task), returned in request order."""
        groups: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(requests):
            self.experts[name]  # an unknown task fails before any work, listing the loaded experts
            groups.setdefault(name, []).append(i)
        out: list[Prediction | None] = [None] * len(requests)
        for name, indices in groups.items():
            for i, prediction in zip(indices, self.classify(name, [requests[i][1] for i in indices], batch_size)):
                out[i] = prediction
        return out

    def memory(self) -> dict[str, int]:
        """Bytes held: the backbone, and per expert what it adds (prompt, head, indices, its own weights, cached
        slices)."""
        backbone = held_bytes(self.backbone)
        experts = {}
        for name in self.names:
            e = self.experts[name]
            extra = [t for _, w, b in (e.slices or []) for t in (w, b) if t is not None]
            experts[name] = held_bytes(e.model, *e.keep, *(e.heads or []), *e.own.values(), *extra) - backbone
        return {"backbone": backbone, **experts}


def _exported_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a saved checkpoint, one tensor at a time (single file or sharded safetensors)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ArtifactError(f"{folder} has no safetensors checkpoint (model.safetensors)")
    for file in files:
        with safe_open(str(folder / file), "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
