"""The task model: a frozen backbone, a trainable prompt (PROMPT_METHODS) and a small head (pooling + linear).

    logits = linear(pool(backbone(prompt(embed(input_ids)))))

Prompt methods (AdapterConfig.prompt_method):
  "input"   m soft-prompt vectors prepended to the token embeddings (Lester et al.): the prompt positions run
            through every layer, FFN and projections included;
  "prefix"  m trained key/value vectors per layer (prefix tuning / P-Tuning v2), handed to the backbone as a
            key/value cache: every text token attends to them in every layer, and they run no FFN and no
            projection at all, so the prompt costs only the attention over m more keys.

input_ids, attention_mask: (batch, seq), right-padded -> logits: (batch, num_labels). `embed` returns the inputs of
the positions the layers run (B, P+T, d) with their mask (P = m for "input", 0 for "prefix"). Pooling
(AdapterConfig.pooling, default from the backbone's family), always over the text tokens, prompt positions excluded:
  "mean"       their mean (what the MiniLM sentence-transformer was trained for);
  "attention"  their mean plus an attention-weighted mean under one learned query vector (d trainable numbers,
               starting at zero, i.e. at twice the mean): lets the head weigh the words that carry the label;
  "last"       the last text token's state (a causal decoder's only position that has read the whole text).
With prompt_length=0 the module is the linear probe on frozen features.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from skeleton.backbones import family_of
from skeleton.registry import Registry

# An adapter folder: the head (and the configuration of the whole adapter) in files of our own, and the prompt
# as its method writes it: an input prompt as a real PEFT prompt-tuning adapter (PEFT's file names and format, so
# `peft.PeftModel.from_pretrained(AutoModel..., folder)` runs it), a prefix in a file of our own name (PEFT's prefix
# tuning gives the text positions after the prefix's, ours keep 0..T-1: not the same model).
HEAD_CONFIG, HEAD_WEIGHTS = "head_config.json", "head.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX_WEIGHTS = "prefix.safetensors"
POOLINGS = ("mean", "attention", "last")


class InputPrompt(nn.Module):
    """m soft-prompt vectors prepended to the token embeddings, initialised from randomly drawn vocabulary
    embeddings (the usual prompt-tuning init). State: "prompt" (m, d)."""

    def __init__(self, backbone: nn.Module, length: int, generator: torch.Generator):
        super().__init__()
        self.length = length
        embeddings = backbone.get_input_embeddings().weight
        rows = torch.randint(0, embeddings.shape[0], (length,), generator=generator)  # drawn on the CPU: any device
        self.prompt = nn.Parameter(embeddings[rows.to(embeddings.device)].detach().clone())

    @property
    def positions(self) -> int:
        """Positions the prompt adds to what every layer runs."""
        return self.length

    def inputs(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokens.shape[0]
        prompt = self.prompt.unsqueeze(0).expand(batch, -1, -1).to(tokens.dtype)
        return torch.cat([prompt, tokens], 1), torch.cat([attention_mask.new_ones(batch, self.length), attention_mask], 1)

    def backbone_kwargs(self, backbone: nn.Module, attention_mask: torch.Tensor) -> dict:
        return {"attention_mask": attention_mask}

    def state(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prompt.copy_(state["prompt"])

    def keep_heads(self, heads: list[torch.Tensor]) -> None:
        """Nothing to do: the prompt is an input, not per head."""

    def save(self, folder: Path, backbone: nn.Module) -> None:
        """PEFT's prompt-tuning adapter for feature extraction: the prompt, prepended to the token embeddings (none
        without a prompt: a linear probe, a fine-tuned model)."""
        if not self.length:
            return
        config = backbone.config.to_dict()  # a per-layer config refuses attribute reads of per-layer fields
        peft = {"peft_type": "PROMPT_TUNING", "task_type": "FEATURE_EXTRACTION", "num_virtual_tokens": self.length,
                "token_dim": self.prompt.shape[1], "num_transformer_submodules": 1,
                "num_attention_heads": config["num_attention_heads"], "num_layers": config["num_hidden_layers"],
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
                "auto_mapping": None, "modules_to_save": None}
        (folder / PEFT_CONFIG).write_text(json.dumps(peft, indent=2))
        save_file({"prompt_embeddings": self.prompt.detach().contiguous()}, str(folder / PEFT_WEIGHTS))

    @staticmethod
    def read(folder: Path) -> dict[str, torch.Tensor]:
        return {"prompt": load_file(str(folder / PEFT_WEIGHTS))["prompt_embeddings"]}


class PrefixPrompt(nn.Module):
    """Per layer, m trained keys and values (2, kv_heads, m, head_dim), given to the backbone as a key/value cache
    in front of the text's own (prefix tuning, P-Tuning v2). The text keeps positions 0..T-1. Initialised with the
    keys and values the backbone itself computes for m randomly drawn vocabulary tokens, so training starts from
    what an input-level prompt of real words would give every layer. State: "prefix.<layer>"."""

    def __init__(self, backbone: nn.Module, length: int, generator: torch.Generator):
        super().__init__()
        self.length = length
        embeddings = backbone.get_input_embeddings().weight
        rows = torch.randint(0, embeddings.shape[0], (1, length), generator=generator)  # drawn on the CPU: any device
        self.cache_kwarg = _cache_kwarg(backbone)
        with torch.no_grad():
            cache = DynamicCache()
            backbone(input_ids=rows.to(embeddings.device), **{self.cache_kwarg: cache}, use_cache=False)
        self.layers = nn.ParameterList(
            [nn.Parameter(torch.stack([layer.keys[0], layer.values[0]]).detach().clone()) for layer in cache.layers])
        self._memo = _Memo()

    @property
    def positions(self) -> int:
        return 0  # the prefix adds keys and values, no positions

    def inputs(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens, attention_mask

    def backbone_kwargs(self, backbone: nn.Module, attention_mask: torch.Tensor) -> dict:
        batch, text = attention_mask.shape
        prefix_mask = attention_mask.new_ones(batch, self.length)
        positions = torch.arange(text, device=attention_mask.device).expand(batch, -1)
        return {"attention_mask": torch.cat([prefix_mask, attention_mask], 1), "position_ids": positions,
                self.cache_kwarg: self.cache(batch)}

    def cache(self, batch: int) -> "PrefixCache":
        """The prefix as a key/value cache for `batch` examples. In inference (no autograd) one is made per batch size
        and kept, so a forward pass does no per-layer Python work for the prefix. A kept cache holds views of the
        prefix parameters, nothing of its own: in-place edits show through, and a CUDA graph captured with it reads
        the parameters themselves; new parameters (loaded, moved, cut to fewer heads) get new caches."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # autograd / dynamo must see it made
            return PrefixCache(self.layers, batch)
        owner = tuple(kv.data_ptr() for kv in self.layers)
        memo = self._memo
        if memo.owner != owner or len(memo) >= _Memo.SIZES:
            memo.clear()
            memo.owner = owner
        cache = memo.get(batch)
        if cache is None:
            cache = memo[batch] = PrefixCache(self.layers, batch)
        return cache

    def state(self) -> dict[str, torch.Tensor]:
        return {f"prefix.{i}": kv for i, kv in enumerate(self.layers)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Takes the saved shapes: a head-pruned skeleton's prefix has fewer heads than the backbone it plugs into."""
        like = self.layers[0]
        self.layers = nn.ParameterList([nn.Parameter(state[f"prefix.{i}"].detach().clone().to(like.device, like.dtype))
                                        for i in range(len(self.layers))])

    def keep_heads(self, heads: list[torch.Tensor]) -> None:
        """Cut the prefix of the attention heads a skeleton removed (kept head indices per layer)."""
        self.layers = nn.ParameterList([nn.Parameter(kv.detach().index_select(1, h.to(kv.device)).clone())
                                        for kv, h in zip(self.layers, heads)])

    def save(self, folder: Path, backbone: nn.Module) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.state().items()}, str(folder / PREFIX_WEIGHTS))

    @staticmethod
    def read(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / PREFIX_WEIGHTS))


class _PrefixLayer(DynamicLayer):
    """One layer of a PrefixCache: the prefix's keys and values (B, kv_heads, m, head_dim), returned in front of the
    text's own by `update`, which stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


class PrefixCache(DynamicCache):
    """A prefix as a key/value cache the backbone reads and never grows: every layer attends to the prefix followed
    by the text, as with a DynamicCache filled with the prefix (same tensors, same numbers), but one cache serves any
    number of forward passes, and the prefix is never copied (each layer's (2, kv_heads, m, head_dim) parameter is
    expanded to the batch as a view)."""

    def __init__(self, prefix: Sequence[torch.Tensor], batch: int):
        Cache.__init__(self, layers=[_PrefixLayer(kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1))
                                     for kv in prefix])


class _Memo(dict):
    """PrefixPrompt's caches by batch size, for the parameters `owner` names. Never copied or pickled with its
    module: a copy makes its own."""

    SIZES = 64  # batch sizes kept at most; past it, start afresh
    owner: tuple = ()

    def __deepcopy__(self, memo):
        return _Memo()

    def __reduce__(self):
        return _Memo, ()


def _cache_kwarg(backbone: nn.Module) -> str:
    """How the backbone's forward takes a key/value cache: BERT's `cache`, everyone else's `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


PROMPT_METHODS: Registry[type] = Registry("prompt method")
PROMPT_METHODS.register("input")(InputPrompt)
PROMPT_METHODS.register("prefix")(PrefixPrompt)


@dataclass
class AdapterConfig:
    num_labels: int
    prompt_length: int = 20
    label_names: list[str] = field(default_factory=list)
    pooling: str | None = None  # one of POOLINGS (see module doc); None: the backbone family's default
    prompt_method: str = "input"  # one of PROMPT_METHODS (see module doc)

    def __post_init__(self):
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {self.num_labels}")
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))} (or None for the backbone "
                             f"family's default), got {self.pooling!r}")
        check_prompt_method(self.prompt_method)


def check_prompt_method(name: str) -> str:
    if name not in PROMPT_METHODS:
        raise ValueError(f"unknown prompt method {name!r}; known: {', '.join(PROMPT_METHODS.names())}")
    return name


class PromptClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, config: AdapterConfig, seed: int = 0):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        if config.pooling is None:
            config = replace(config, pooling=family_of(backbone).default_pooling)
        self.config = config
        embeddings = backbone.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(seed)
        method = PROMPT_METHODS[config.prompt_method] if config.prompt_length else InputPrompt
        self.prompt = method(backbone, config.prompt_length, generator)
        # The head (and query) where the backbone is, in its dtype: the pooled features come in that dtype
        like = dict(device=embeddings.device, dtype=embeddings.dtype)
        self.head = nn.Linear(embeddings.shape[1], config.num_labels)
        self.query = nn.Parameter(torch.zeros(embeddings.shape[1], **like)) if config.pooling == "attention" else None
        with torch.no_grad():
            self.head.weight.normal_(0, 0.02, generator=generator)  # on the CPU: the same start on every device
            self.head.bias.zero_()
        self.head.to(**like)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the backbone stays in eval mode: frozen, no dropout
        return self

    @property
    def prompt_positions(self) -> int:
        """Positions the prompt adds to what every layer runs: m for an input prompt, 0 for a prefix."""
        return self.prompt.positions

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(inputs_embeds (B, P+T, d), attention_mask (B, P+T)) of the positions the layers run."""
        return self.prompt.inputs(self.backbone.get_input_embeddings()(input_ids), attention_mask)

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states (B, P+T, d)."""
        kwargs = self.prompt.backbone_kwargs(self.backbone, attention_mask)
        return self.backbone(inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state

    def features(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.hidden(inputs_embeds, attention_mask), attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, P+T, d) hidden states -> (B, d) features of the text tokens (the first P positions are the prompt)."""
        if self.config.pooling == "last":  # the last attended position: the last text token under right padding
            last = (attention_mask * torch.arange(attention_mask.shape[1], device=attention_mask.device)).argmax(1)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        p = self.prompt_positions
        text, mask = hidden[:, p:], attention_mask[:, p:].unsqueeze(-1).to(hidden.dtype)
        mean = (text * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.query is None:
            return mean
        scores = (text @ self.query).float()  # float: under bf16 autocast the -inf fill must not overflow
        weights = scores.masked_fill(mask[..., 0] == 0, torch.finfo(scores.dtype).min).softmax(1)
        # Summed in float too, but the features leave in the hidden states' dtype, as the other poolings' do: a bf16
        # model's head gets bf16 (under autocast the head casts to bf16 anyway: the same numbers as before)
        return (mean + (weights.unsqueeze(-1) * text).sum(1)).to(hidden.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(*self.embed(input_ids, attention_mask)))

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(logits, every layer's output at the text positions [(B, T, d)] * layers, text mask (B, T)): what
        layer-by-layer distillation compares."""
        embeds, mask = self.embed(input_ids, attention_mask)
        kwargs = self.prompt.backbone_kwargs(self.backbone, mask)
        out = self.backbone(inputs_embeds=embeds, use_cache=False, output_hidden_states=True, **kwargs)
        p = self.prompt_positions
        logits = self.head(self.pool(out.last_hidden_state, mask))
        return logits, [h[:, p:] for h in out.hidden_states[1:]], mask[:, p:]

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains besides the prompt: the linear layer, and the pooling query if there is one."""
        return [*self.head.parameters(), *([self.query] if self.query is not None else [])]

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {"head.weight": self.head.weight, "head.bias": self.head.bias}
        if self.query is not None:
            state["query"] = self.query
        return {k: v.detach() for k, v in state.items()}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What a task owns: its prompt and its head."""
        return {**{k: v.detach() for k, v in self.prompt.state().items()}, **self.head_state()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_adapter(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head_state().items()}, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))
        self.prompt.save(folder, self.backbone)

    @classmethod
    def from_adapter(cls, backbone: nn.Module, folder: str | Path) -> "PromptClassifier":
        folder = Path(folder)
        if not (folder / HEAD_CONFIG).is_file():  # written before the head had files of its own
            return cls._from_old_adapter(backbone, folder)
        config = AdapterConfig(**json.loads((folder / HEAD_CONFIG).read_text()))
        model = cls(backbone, config)
        prompt = model.prompt.read(folder) if config.prompt_length else {"prompt": model.prompt.prompt}
        model.load_adapter_state({**load_file(str(folder / HEAD_WEIGHTS)), **prompt})
        return model

    @classmethod
    def _from_old_adapter(cls, backbone: nn.Module, folder: Path) -> "PromptClassifier":
        """An adapter exported before this format: our config and every tensor under PEFT's file names (and, before
        pooling was configurable, mean pooling)."""
        config = AdapterConfig(**{"pooling": "mean", **json.loads((folder / PEFT_CONFIG).read_text())})
        model = cls(backbone, config)
        model.load_adapter_state(load_file(str(folder / PEFT_WEIGHTS)))
        return model

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.prompt.load_state(state)
        with torch.no_grad():
            self.head.weight.copy_(state["head.weight"])
            self.head.bias.copy_(state["head.bias"])
            if self.query is not None:
                self.query.copy_(state["query"])
