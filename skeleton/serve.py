"""Unplug and play: one backbone in memory, many task experts, each always ready, none locked.

An expert is what a skeleton adds to the backbone it was cut from: the kept FFN neurons per layer (indices into
the original FFN, from neurons.json; widths may differ per layer), the kept attention heads if heads were pruned,
its adapter (prompt + head), and the weights it changed: a reconstructed skeleton's refit down projections, the
normalisation layers of one whose meta says tune_norms. At `add`, the server builds the expert's own network: a
copy of the backbone's module tree whose every unchanged tensor IS the backbone's (embeddings, attention, norms:
the same storage, not a copy), with the expert's kept FFN (and head) slices and changed weights in place of the
full ones. Nothing is swapped per request, so any number of threads can run any experts at once, and answering
another task costs nothing. An expert holds only its slices, prompt and head (`memory()`).

    server = SkeletonServer.load("minilm")
    server.add("artifacts/skeletons/429c299c193c")          # named <task>-<method>-p<rate> from its neurons.json
    server.classify("rotten_tomatoes-grad_x_act-p0.5", ["a gripping film"])   # -> [Prediction(label=..., ...)]
    server.serve([("task-a", "text 1"), ("task-b", "text 2")])               # one batch per task, request order

The outputs equal those of the exported skeleton (same weights, same shapes, same kernels). An expert whose
exported backbone is not an index-selection of this backbone is refused at `add`, with the reason.
"""
from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

from skeleton.backbones import attention_blocks, family_of, load_backbone, norm_parameters
from skeleton.execution import Runner, check_mode
from skeleton.folder import ArtifactError, SkeletonFolder
from skeleton.model import PromptClassifier
from skeleton.registry import Registry
from skeleton.skeleton_bert import register

DEFAULT_MAX_LENGTH = 64  # truncation when the skeleton does not record the max_length it was trained with
# Config fields an expert may differ in from its backbone: pruned shapes (the tensors' shapes are checked instead),
# the checkpoint class of a family (model_type, checked against the family) and bookkeeping.
CONFIG_IGNORED = {"intermediate_size", "per_layer_config", "model_type", "_name_or_path", "transformers_version",
                  "architectures", "dtype", "torch_dtype", "id2label", "label2id"}


# What one more forward pass of the full backbone costs, in padded token positions: on a CPU time follows the positions
# a pass runs, plus a fixed cost per pass (Python, kernel dispatch) of about this many (MiniLM, 1 or 2 threads:
# docs/results.md). An expert's positions are cheaper in proportion to its multiply-adds, so the same fixed cost is
# more of them (Expert.pass_cost). On a GPU a pass costs its launches whatever the padding: one pass takes everything.
PASS_COST = {"cpu": 40}


def length_batches(lengths: Sequence[int], max_size: int, pass_cost: int | None) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches of at most `max_size` texts of similar length so that the padded
    positions plus `pass_cost` per batch are fewest: sorted by length, then cut by dynamic programming."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if pass_cost is None:
        return [order[i : i + max_size] for i in range(0, len(order), max_size)]
    cost, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(max(0, end - max_size), end):  # a batch order[start:end], padded to its longest
            total = cost[start] + pass_cost + (end - start) * lengths[order[end - 1]]
            if total < cost[end]:
                cost[end], cut[end] = total, start
    batches, end = [], len(order)
    while end:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


class ExpertMismatchError(ValueError):
    """A skeleton that is not an expert of the loaded backbone: its weights are not a slice of the backbone's."""


def _storages(*objects: nn.Module | torch.Tensor) -> dict[tuple, int]:
    """(device, address) -> bytes of the distinct tensor storages held by modules (parameters, buffers) and tensors."""
    seen: dict[tuple, int] = {}
    for obj in objects:
        tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else [obj]
        for t in tensors:
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return seen


def _position_macs(network: nn.Module) -> int:
    """Multiply-adds of the network's linear layers per position: what its time per token follows."""
    return sum(m.in_features * m.out_features for m in network.modules() if isinstance(m, nn.Linear))


def held_bytes(*objects: nn.Module | torch.Tensor) -> int:
    """Bytes of the distinct tensor storages held by modules (parameters and buffers) and tensors."""
    return sum(_storages(*objects).values())


class _Slot(NamedTuple):
    name: str  # the linear's module name in the backbone (and in every expert's copy of it)
    linear: nn.Linear  # the backbone's own
    dim: int  # 0: the kept units are output rows (FFN up, attention q/k/v); 1: input columns (down, attention out)


@dataclass
class Prediction:
    task: str
    label: str
    probabilities: dict[str, float]  # label -> probability, in the head's label order


@dataclass
class Expert:
    name: str
    folder: SkeletonFolder
    keep: list[torch.Tensor]  # per FFN layer, indices into the backbone's neurons (widths may differ per layer)
    heads: list[torch.Tensor] | None  # per layer, kept attention heads; None: all
    model: PromptClassifier  # its own network: the backbone's tensors, its slices, prompt and head
    runner: Runner  # how its forward passes run (eager, CUDA-graph replay, compiled)
    pass_cost: int | None  # a forward pass's fixed cost in its own padded positions (length_batches); None: one pass
    # backbone parameters (by state-dict name) the skeleton changed, so its own, not a slice: refit down
    # projections (reconstructed), normalisation layers (tune_norms)
    own: dict[str, nn.Parameter]
    max_length: int
    meta: dict

    @property
    def labels(self) -> list[str]:
        names = self.model.config.label_names
        return list(names) if names else [str(i) for i in range(self.model.config.num_labels)]


class SkeletonServer:
    """One backbone (the original, full model) and any number of task experts, each a network of its own that
    shares the backbone's tensors. Thread-safe: experts are never modified after `add`. `execution`
    (skeleton.execution.MODES): how each expert's passes run; "graph" (CUDA) captures every padded shape bucket
    of an expert at `add`, so requests only replay."""

    def __init__(self, backbone: nn.Module, tokenizer, source: str = "backbone", execution: str = "eager"):
        self.backbone = backbone.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.source = source
        self.execution = check_mode(execution, next(backbone.parameters()).device)
        register()  # experts' checkpoints may be per-layer "skeleton_bert" ones (their configs are read at `add`)
        self.experts: Registry[Expert] = Registry("task expert")
        self.family = family_of(backbone)
        names = {id(module): name for name, module in backbone.named_modules()}
        # Per layer, the linears an expert slices: FFN neurons are rows of "up" and columns of "down"; attention heads
        # (families that know them) rows of q/k/v, columns of the output projection.
        self._ffn = [[_Slot(names[id(up)], up, 0) for up in block.up] + [_Slot(names[id(block.down)], block.down, 1)]
                     for block in self.family.ffn_blocks(backbone)]
        self._attention = attention_blocks(backbone)
        self._heads = [block.num_heads for block in self._attention]
        self._attn = [[_Slot(names[id(linear)], linear, 0) for linear in block.qkv]
                      + [_Slot(names[id(block.out)], block.out, 1)] for block in self._attention]
        self._names = {id(parameter): name for name, parameter in backbone.named_parameters()}
        self._adding = threading.Lock()  # `add` checks the registry and registers: one at a time
        self._local = threading.local()  # a tokenizer per thread: a fast tokenizer's truncation state is shared

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", execution: str = "eager"):
        backbone, tokenizer = load_backbone(name_or_path)
        return cls(backbone.to(device), tokenizer, source=name_or_path, execution=execution)

    @classmethod
    def of_folder(cls, folder: str | Path, device: str | torch.device = "cpu",
                  execution: str = "eager") -> tuple[SkeletonServer, str]:
        """(a server of one exported skeleton on its own, sliced backbone, the expert's name): no full backbone
        needed, the same inference path. The folder is verified as it loads."""
        folder = SkeletonFolder(folder)
        model, tokenizer, record = folder.load()
        model = model.to(device)
        server = cls(model.backbone, tokenizer, source=str(folder), execution=execution)
        meta, name = folder.meta(), folder.name()
        with server._adding:
            server._register(Expert(name, folder, [torch.arange(w) for w in meta["kept_widths"]], None, model, None,
                                    None, {}, int(meta.get("max_length") or DEFAULT_MAX_LENGTH), meta))
        return server, name

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def names(self) -> list[str]:
        return self.experts.names()

    # ---- loading experts ----------------------------------------------------------------------------------

    def add(self, folder: str | Path, name: str | None = None) -> str:
        """Verify a skeleton folder, check it was cut from this backbone, and build its expert. Returns its name."""
        folder = SkeletonFolder(folder)
        try:
            folder.verify()
        except ArtifactError as e:
            raise ArtifactError(f"expert {name or folder.path.name!r}: {e}") from None
        record, meta, name = folder.record(), folder.meta(), name or folder.name()
        with self._adding:
            if name in self.experts:
                raise ValueError(f"an expert named {name!r} is already loaded (from {self.experts[name].folder}); "
                                 "pass a different name")
            keep = self._check_index(name, folder, "neuron", record["keep"], [s[-1].linear.in_features
                                                                               for s in self._ffn])
            heads = None
            if record.get("heads"):
                if not self._attention:
                    raise ExpertMismatchError(f"expert {name!r} ({folder}) prunes attention heads, which the "
                                              f"{type(self.family).__name__} cannot plug in")
                heads = self._check_index(name, folder, "head", record["heads"], self._heads)
            expert = Expert(name, folder, keep, heads, None, None, None, {},
                            int(meta.get("max_length") or DEFAULT_MAX_LENGTH), meta)
            self._check_backbone(expert)
            network = self._network(expert)
            expert.model = PromptClassifier.from_adapter(network, folder.adapter).to(self.device).eval()
            self._register(expert)
        return name

    def _register(self, expert: Expert) -> None:
        """Give the expert its runner (graphs captured now) and make it servable; under self._adding."""
        expert.runner = Runner(expert.model, self.execution, pad_id=self._pad_id())
        if self.execution != "eager":
            expert.runner.prepare()
        full = PASS_COST.get(self.device.type) if self.execution == "eager" else None
        if full is not None:
            expert.pass_cost = round(full * _position_macs(self.backbone) / _position_macs(expert.model.backbone))
        self.experts.register(expert.name)(expert)

    def _check_index(self, name: str, folder: SkeletonFolder, unit: str, lists: list[list[int]],
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
        """(slot, indices along slot.dim) of every linear the expert slices; a layer it keeps whole is left out."""
        for layer, index in zip(self._ffn, expert.keep):
            if len(index) < layer[-1].linear.in_features:
                for slot in layer:
                    yield slot, index
        for layer, block, heads in zip(self._attn, self._attention, expert.heads or []):
            if len(heads) < block.num_heads:
                rows = (heads[:, None] * block.head_dim + torch.arange(block.head_dim, device=heads.device)).flatten()
                for slot in layer:
                    yield slot, rows

    def _ownable(self, expert: Expert) -> set[str]:
        """Names of the backbone parameters the expert's meta says it changed (reconstruct, tune_norms)."""
        names = set()
        if expert.meta.get("reconstruct"):  # refit down projections: weight, and bias where the family has one
            names |= {self._names[id(t)] for layer in self._ffn for t in (layer[-1].linear.weight, layer[-1].linear.bias)
                      if t is not None}
        if expert.meta.get("tune_norms"):
            names |= set(norm_parameters(self.backbone))
        return names

    @torch.no_grad()
    def _network(self, expert: Expert) -> nn.Module:
        """The expert's backbone: new modules over the backbone's own tensors, then its slices and own weights in."""
        shared = {id(t): t for t in [*self.backbone.parameters(), *self.backbone.buffers()]}
        network = copy.deepcopy(self.backbone, memo=shared)
        for slot, index in self._sliced(expert):
            linear = network.get_submodule(slot.name)
            linear.weight = nn.Parameter(slot.linear.weight.index_select(slot.dim, index), requires_grad=False)
            if slot.dim == 0 and slot.linear.bias is not None:  # a down / output bias is per output feature: kept
                linear.bias = nn.Parameter(slot.linear.bias[index], requires_grad=False)
            linear.out_features, linear.in_features = linear.weight.shape
        for block, heads in zip(self.family.attention_blocks(network) if expert.heads else [], expert.heads or []):
            self.family.set_num_heads(block, len(heads))
        for name, parameter in expert.own.items():
            module, _, attribute = name.rpartition(".")
            setattr(network.get_submodule(module), attribute, parameter)
        return network

    @torch.no_grad()
    def _check_backbone(self, expert: Expert) -> None:
        """Every exported tensor must equal the backbone's (sliced ones: index-selected), and the config agree."""
        from transformers import AutoConfig, AutoTokenizer

        def refuse(why: str):
            raise ExpertMismatchError(f"expert {expert.name!r} ({expert.folder}) is not an expert of backbone "
                                      f"{self.source!r}: {why}")

        folder = expert.folder.backbone
        theirs = AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()
        ours = self.backbone.config.to_dict()
        if theirs["model_type"] not in self.family.model_types:
            refuse(f"its model_type {theirs['model_type']!r} is not of the {type(self.family).__name__}")
        if "head_dim" in theirs and "head_dim" not in ours:  # explicit in per-layer checkpoints; derived in ours
            ours["head_dim"] = ours["hidden_size"] // ours["num_attention_heads"]
        differ = sorted(k for k in (set(theirs) | set(ours)) - CONFIG_IGNORED if theirs.get(k) != ours.get(k))
        if differ:
            refuse("config differs in " + ", ".join(f"{k} ({theirs.get(k)!r} vs {ours.get(k)!r})" for k in differ[:5]))
        expected = self.backbone.state_dict()
        sliced = {}  # state-dict name -> (dim, index) of the slice an expert keeps
        for slot, index in self._sliced(expert):
            sliced[self._names[id(slot.linear.weight)]] = (slot.dim, index)
            if slot.linear.bias is not None and slot.dim == 0:
                sliced[self._names[id(slot.linear.bias)]] = (0, index)
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

    # ---- inference ---------------------------------------------------------------------------------------

    def _tokenizer(self):
        """This thread's copy of the tokenizer (calls with other truncation settings must not interleave)."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer

    def token_ids(self, name: str, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, truncated to the expert's max_length."""
        if not texts:
            return []
        return self._tokenizer()(list(texts), truncation=True, max_length=self.experts[name].max_length)["input_ids"]

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), (batch, longest row), right-padded as the training collator pads."""
        ids = torch.full((len(rows), max(map(len, rows))), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def encode(self, name: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts as one padded batch."""
        return self.pad(self.token_ids(name, texts))

    @torch.inference_mode()
    def logits(self, name: str, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), num_labels) logits of one task's expert: texts of similar length share a forward pass of at
        most `batch_size` (length_batches), so short texts are not padded to the longest one's length (eager passes;
        graphs pad to their buckets whatever comes)."""
        expert = self.experts[name]
        ids = self.token_ids(name, texts)
        out = torch.empty(len(ids), expert.model.config.num_labels)
        for rows in length_batches([len(row) for row in ids], batch_size, expert.pass_cost):
            out[rows] = expert.runner(*self.pad([ids[i] for i in rows])).float().cpu()
        return out

    def classify(self, name: str, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        labels = self.experts[name].labels
        probs = torch.softmax(self.logits(name, texts, batch_size), -1).tolist()
        return [Prediction(name, labels[max(range(len(p)), key=p.__getitem__)], dict(zip(labels, p))) for p in probs]

    def serve(self, requests: Sequence[tuple[str, str]], batch_size: int = 32) -> list[Prediction]:
        """Answer (task, text) requests: one batch per task, answers in request order."""
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
        """Bytes held: the backbone, and per expert what it holds beyond the backbone's tensors (its slices, own
        weights, prompt, head, indices)."""
        backbone = _storages(self.backbone)
        experts = {}
        for name in self.names:
            e = self.experts[name]
            own = _storages(e.model, *e.keep, *(e.heads or []))
            experts[name] = sum(size for key, size in own.items() if key not in backbone)
        return {"backbone": sum(backbone.values()), **experts}


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
