"""A BERT whose layers each have their own FFN width and number of attention heads: checkpoints of pruned skeletons.

transformers 5.x configs carry per-layer overrides in `per_layer_config` (a sparse mapping layer index ->
attributes that differ from the global config), but stock BERT builds every layer from the global values. These
thin subclasses build layer i from `config.per_layer_config[i]`; everything else, forward included, is stock BERT.

    config.json: {"model_type": "skeleton_bert", "intermediate_size": 1536, "num_attention_heads": 12,
                  "head_dim": 32, "per_layer_config": {"0": {"intermediate_size": 512, "num_attention_heads": 9}}}

BERT derives its head size as hidden_size / num_attention_heads, which no longer holds once heads are removed, so
the head size is an explicit `head_dim` (as in LLaMA). The global intermediate_size / num_attention_heads stay
those of the original model. `register()` adds the classes to AutoConfig / AutoModel /
AutoModelForSequenceClassification, so a stock `from_pretrained` loads such checkpoints; the library's loaders
(SkeletonFolder.load, backbones.load_backbone) call it, importing this module does not. Uniform FFN-only skeletons
do not need them and stay stock "bert" checkpoints.
"""
from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (BertEmbeddings, BertEncoder, BertForSequenceClassification,
                                                    BertLayer, BertModel, BertPooler, BertPreTrainedModel)

MODEL_TYPE = "skeleton_bert"


@strict
class SkeletonBertConfig(BertConfig):
    """BertConfig with an explicit head size; per-layer intermediate_size / num_attention_heads in per_layer_config."""

    model_type = MODEL_TYPE
    head_dim: int | None = None  # default hidden_size // num_attention_heads, the stock BERT head size

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads  # per_layer_config is applied after this
        super().__post_init__(**kwargs)


def resize_attention(attention: nn.Module, heads: int) -> None:
    """Give a BertAttention block `heads` heads of unchanged size (fresh weights: for building, not pruning)."""
    inner = attention.self
    width = heads * inner.attention_head_size
    inner.query, inner.key, inner.value = (nn.Linear(inner.query.in_features, width) for _ in range(3))
    attention.output.dense = nn.Linear(width, attention.output.dense.out_features)
    inner.num_attention_heads, inner.all_head_size = heads, width


class SkeletonBertLayer(BertLayer):
    def __init__(self, config: SkeletonBertConfig, layer_idx: int):
        layer_config = copy.copy(config.per_layer_config[layer_idx])  # a plain config with this layer's values
        heads = layer_config.num_attention_heads
        # Build a stock layer whose head size is head_dim, then give its attention the layer's head count.
        layer_config.num_attention_heads = config.hidden_size // config.head_dim
        super().__init__(layer_config, layer_idx=layer_idx)
        if heads != layer_config.num_attention_heads:
            resize_attention(self.attention, heads)
        self.attention.self.config = config  # attention reads the implementation (eager/sdpa) from the model config


class SkeletonBertEncoder(BertEncoder):
    def __init__(self, config: SkeletonBertConfig):
        nn.Module.__init__(self)
        self.config = config
        self.layer = nn.ModuleList([SkeletonBertLayer(config, i) for i in range(config.num_hidden_layers)])


class SkeletonBertModel(BertModel):
    config_class = SkeletonBertConfig
    _no_split_modules = ["BertEmbeddings", "SkeletonBertLayer"]

    def __init__(self, config: SkeletonBertConfig, add_pooling_layer: bool = True):
        BertPreTrainedModel.__init__(self, config)  # BertModel.__init__ with the per-layer encoder
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = SkeletonBertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()


class SkeletonBertForSequenceClassification(BertForSequenceClassification):
    config_class = SkeletonBertConfig

    def __init__(self, config: SkeletonBertConfig):
        BertPreTrainedModel.__init__(self, config)  # BertForSequenceClassification.__init__ with SkeletonBertModel
        self.num_labels = config.num_labels
        self.config = config
        self.bert = SkeletonBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


def per_layer_bert_config(config: BertConfig, widths: list[int], heads: list[int], head_dim: int) -> BertConfig:
    """The checkpoint config of a BERT whose layer i has FFN width widths[i] and heads[i] heads of head_dim.

    Same widths everywhere and every head kept: a copy of the stock config with that intermediate_size (stock
    transformers loads it). Otherwise a SkeletonBertConfig whose global values are the original model's."""
    full_heads = config.hidden_size // head_dim
    values = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "per_layer_config", "head_dim", "architectures", "transformers_version")}
    values["num_attention_heads"] = full_heads
    if len(set(widths)) == 1 and all(h == full_heads for h in heads):
        return BertConfig(**{**values, "intermediate_size": widths[0]})
    overrides = {i: {"intermediate_size": w, "num_attention_heads": h} for i, (w, h) in enumerate(zip(widths, heads))}
    return SkeletonBertConfig(**values, head_dim=head_dim, per_layer_config=overrides)


def register() -> None:
    """Make AutoConfig / AutoModel / AutoModelForSequenceClassification load "skeleton_bert" checkpoints (idempotent):

        from skeleton.skeleton_bert import register
        register()
        AutoModel.from_pretrained("artifacts/skeletons/<hash>/backbone")
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    AutoConfig.register(MODEL_TYPE, SkeletonBertConfig, exist_ok=True)
    AutoModel.register(SkeletonBertConfig, SkeletonBertModel, exist_ok=True)
    AutoModelForSequenceClassification.register(SkeletonBertConfig, SkeletonBertForSequenceClassification,
                                                exist_ok=True)
