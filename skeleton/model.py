"""The task model: a frozen backbone, m trainable soft-prompt vectors and a small head (pooling + linear).

    logits = linear(pool(backbone([prompt; embed(input_ids)])))

input_ids, attention_mask: (batch, seq), right-padded -> logits: (batch, num_labels). Pooling (AdapterConfig.pooling,
default from the backbone's family), always over the text tokens, prompt positions excluded:
  "mean"       their mean (what the MiniLM sentence-transformer was trained for);
  "attention"  their mean plus an attention-weighted mean under one learned query vector (d trainable numbers,
               starting at zero, i.e. at twice the mean): lets the head weigh the words that carry the label;
  "last"       the last text token's state (a causal decoder's only position that has read the whole text).
With prompt_length=0 the module is the linear probe on frozen features.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from skeleton.backbones import family_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
POOLINGS = ("mean", "attention", "last")


@dataclass
class AdapterConfig:
    num_labels: int
    prompt_length: int = 20
    label_names: list[str] = field(default_factory=list)
    pooling: str | None = None  # one of POOLINGS (see module doc); None: the backbone family's default

    def __post_init__(self):
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {self.num_labels}")
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))} (or None for the backbone "
                             f"family's default), got {self.pooling!r}")


class PromptClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, config: AdapterConfig, seed: int = 0):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        if config.pooling is None:
            config = replace(config, pooling=family_of(backbone).default_pooling)
        self.config = config
        embeddings = backbone.get_input_embeddings().weight
        # Initialise the prompt from randomly drawn vocabulary embeddings: the usual prompt-tuning init.
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, embeddings.shape[0], (config.prompt_length,), generator=generator)
        self.prompt = nn.Parameter(embeddings[rows].detach().clone())
        self.head = nn.Linear(embeddings.shape[1], config.num_labels)
        self.query = nn.Parameter(torch.zeros(embeddings.shape[1])) if config.pooling == "attention" else None
        with torch.no_grad():
            self.head.weight.normal_(0, 0.02, generator=generator)
            self.head.bias.zero_()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the backbone stays in eval mode: frozen, no dropout
        return self

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(inputs_embeds (B, m+T, d), attention_mask (B, m+T)) with the prompt prepended."""
        tokens = self.backbone.get_input_embeddings()(input_ids)
        batch = input_ids.shape[0]
        prompt = self.prompt.unsqueeze(0).expand(batch, -1, -1)
        prompt_mask = attention_mask.new_ones(batch, self.config.prompt_length)
        return torch.cat([prompt, tokens], 1), torch.cat([prompt_mask, attention_mask], 1)

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states (B, m+T, d)."""
        return self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def features(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.hidden(inputs_embeds, attention_mask), attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, m+T, d) hidden states -> (B, d) features of the text tokens (the first m positions are the prompt)."""
        if self.config.pooling == "last":  # the last attended position: the last text token under right padding
            last = (attention_mask * torch.arange(attention_mask.shape[1], device=attention_mask.device)).argmax(1)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        m = self.config.prompt_length
        text, mask = hidden[:, m:], attention_mask[:, m:].unsqueeze(-1).to(hidden.dtype)
        mean = (text * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.query is None:
            return mean
        scores = (text @ self.query).float()  # float: under bf16 autocast the -inf fill must not overflow
        weights = scores.masked_fill(mask[..., 0] == 0, torch.finfo(scores.dtype).min).softmax(1)
        return mean + (weights.unsqueeze(-1) * text).sum(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(*self.embed(input_ids, attention_mask)))

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains besides the prompt: the linear layer, and the pooling query if there is one."""
        return [*self.head.parameters(), *([self.query] if self.query is not None else [])]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = {"prompt": self.prompt, "head.weight": self.head.weight, "head.bias": self.head.bias}
        if self.query is not None:
            state["query"] = self.query
        return {k: v.detach() for k, v in state.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_adapter(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.adapter_state().items()}, str(folder / ADAPTER_WEIGHTS))
        (folder / ADAPTER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_adapter(cls, backbone: nn.Module, folder: str | Path) -> "PromptClassifier":
        folder = Path(folder)
        # adapters saved before pooling was configurable all pooled by mean
        config = AdapterConfig(**{"pooling": "mean", **json.loads((folder / ADAPTER_CONFIG).read_text())})
        model = cls(backbone, config)
        model.load_adapter_state(load_file(str(folder / ADAPTER_WEIGHTS)))
        return model

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prompt.copy_(state["prompt"])
            self.head.weight.copy_(state["head.weight"])
            self.head.bias.copy_(state["head.bias"])
            if self.query is not None:
                self.query.copy_(state["query"])
