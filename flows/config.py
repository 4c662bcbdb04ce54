"""The sweep's (and the nightly run's) parameters, declared once.

Each field of `SweepConfig` is one parameter: its name, type, default and help text. The Prefect flow's
parameters (`flow_parameters`), the command-line options (`add_options`), the MLflow params (`params`) and the
tests' helper all derive from the fields, so adding a parameter is adding one field here.

A field whose default is None takes the backbone family's value (`skeleton.backbones.Family.sweep_defaults`):
budgets differ between a small encoder and a decoder whose step costs ~8x more. `resolved()` fills them in.
Plain Python at import time (the command line's --help must not load torch); checks that need the library
import it when a configuration is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass, field, fields


def option(default, help: str, family: bool = False):
    """A configuration field with its help text. family=True: None means the backbone family's value
    (skeleton.backbones.Family.sweep_defaults). Lists get a fresh copy per instance."""
    metadata = {"help": help, "family": family}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SweepConfig:
    task: str = option("rotten_tomatoes", "registered task (skeleton.data.TASKS); ignored with --data-file")
    backbone: str = option("minilm", "registered backbone name or a local checkpoint folder")
    rates: list[float] = option([0.5, 0.65, 0.8], "FFN pruning rates: the share of FFN neurons each skeleton cuts")
    methods: list[str] | None = option(None, "neuron selection methods to compare, or 'all' for every registered one", family=True)
    head_rates: list[float] = option([0.0], "shares of attention heads to cut as well (each with every FFN rate)")
    allocation: str = option("uniform", "how kept neurons and heads spread over layers: uniform, global or per_layer")
    reconstruct: bool | None = option(None, "refit the kept neurons' down-projection columns by least squares so "
                                      "the FFN output keeps what the removed neurons added", family=True)
    tune_norms: bool | None = option(None, "also train the normalisation layers with the full model's prompt (a "
                                     "like-for-like baseline for --retune-norms; its skeletons inherit them)", family=True)
    retune_norms: bool | None = option(None, "let skeleton re-tuning also train the normalisation layers, which "
                                       "then belong to the task's expert", family=True)
    target_speedups: list[float] = option([], "joint-budget points: cut FFN neurons and heads until the "
                                          "multiply-adds fall by this factor (e.g. 2.0); the mix with the lowest "
                                          "validation loss before re-tuning is kept")
    prompt_length: int = option(20, "prompt vectors (per layer for a prefix)")
    prompt_methods: list[str] | None = option(None, "prompt methods to compare, each with its own full model and "
                                              "skeletons: input (soft prompt vectors before the text) or prefix "
                                              "(trained keys and values in every layer; the prompt then runs no FFN)",
                                              family=True)
    finetune: bool = option(False, "also fine-tune every backbone weight (same head, same steps) as a reference row")
    max_length: int = option(64, "text tokens per example (truncation)")
    train_steps: int | None = option(None, "prompt-tuning steps of the full model", family=True)
    train_evals: int | None = option(None, "validation checks while prompt-tuning the full model (best kept)", family=True)
    retune_steps: int | None = option(None, "re-tuning steps per skeleton", family=True)
    retune_evals: int | None = option(None, "validation checks while re-tuning a skeleton (best kept)", family=True)
    distill: float = option(0.0, "weight of the full model's soft labels when re-tuning a skeleton (0 = off)")
    distill_hidden: float = option(0.0, "weight of layer-by-layer distillation of the full model's hidden states "
                                   "when re-tuning a skeleton (0 = off)")
    retune_patience: int = option(0, "stop re-tuning after this many validation checks without a new best (0 = off)")
    precision: str = option("auto", "training arithmetic: fp32, bf16, or auto (bf16 where the CPU or GPU has it in "
                            "hardware, e.g. AVX512-BF16: ~1.7x faster steps; fp32 elsewhere, where bf16 is emulated "
                            "and 30x slower); evaluation and exports are always float32")
    attribution_examples: int | None = option(None, "training examples to score neurons on", family=True)
    benchmark_repeats: int = option(20, "timed rounds per model in the latency benchmark (more: steadier speed-ups)")
    seeds: list[int] = option([0], "training seeds; with several the table shows mean and spread")
    data_file: str | None = option(None, "your own CSV / JSONL / Parquet file instead of --task")
    text_column: str = option("text", "text column of --data-file")
    label_column: str = option("label", "label column of --data-file")
    experiment: str = option("skeleton", "MLflow experiment name")

    def __post_init__(self):
        # The library's own checks (imported here: they load torch), so a bad value fails before any work.
        from skeleton.budget import check_target_speedup
        from skeleton.model import check_prompt_method
        from skeleton.prune import check_allocation, check_head_rate, check_rate
        from skeleton.train import check_precision

        self.rates = [check_rate(r) for r in self.rates]
        self.head_rates = [check_head_rate(r) for r in self.head_rates]
        self.target_speedups = [check_target_speedup(t) for t in self.target_speedups]
        check_allocation(self.allocation)
        check_precision(self.precision)
        if self.prompt_methods is not None and not self.prompt_methods:
            raise ValueError("prompt_methods must name at least one prompt method, e.g. [input] or [input, prefix]")
        for name in self.prompt_methods or []:
            check_prompt_method(name)
        if not self.seeds:
            raise ValueError("seeds must name at least one seed, e.g. [0] or [0, 1, 2]")
        for name in ("train_evals", "retune_evals", "prompt_length", "max_length", "benchmark_repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def resolved(self) -> SweepConfig:
        """A copy with every family field left None set to the backbone family's value, 'all' methods expanded,
        names checked against their registries and the training configurations built once: an unknown backbone
        or method, or a bad budget, fails here, before any work."""
        from skeleton.attribution import METHODS, scores_heads
        from skeleton.backbones import sweep_defaults
        from skeleton.train import TrainConfig, resolve_precision

        defaults = sweep_defaults(self.backbone)
        config = dataclasses.replace(self, **{f.name: defaults[f.name] for f in fields(self)
                                              if f.metadata["family"] and getattr(self, f.name) is None})
        config.precision = resolve_precision(self.precision)  # this machine's: the sweep's runs record what ran
        if config.methods == ["all"]:
            config.methods = METHODS.names()
        for method in config.methods:
            METHODS[method]
        if any(config.head_rates):
            unable = [m for m in config.methods if not scores_heads(m)]
            if unable:
                raise ValueError(f"head rates > 0 need methods that score attention heads; {', '.join(unable)} "
                                 f"do not (those that do: {', '.join(m for m in METHODS if scores_heads(m))})")
        for seed in config.seeds:
            TrainConfig(**config.train_config(seed))
            TrainConfig(**config.retune_config(seed))
            TrainConfig(**config.finetune_config(seed))
        return config

    def train_config(self, seed: int) -> dict:
        """skeleton.train.TrainConfig of the full model's prompt tuning (of a resolved configuration)."""
        return {"steps": self.train_steps, "eval_every": max(1, self.train_steps // self.train_evals), "seed": seed,
                "precision": self.precision, "tune_norms": self.tune_norms}

    def retune_config(self, seed: int) -> dict:
        """skeleton.train.TrainConfig of each skeleton's re-tuning (of a resolved configuration)."""
        return {"steps": self.retune_steps, "warmup_steps": 10, "eval_every": max(1, self.retune_steps // self.retune_evals),
                "distill": self.distill, "precision": self.precision, "tune_norms": self.retune_norms, "seed": seed,
                "distill_hidden": self.distill_hidden, "patience": self.retune_patience}

    def finetune_config(self, seed: int) -> dict:
        """skeleton.train.TrainConfig of the fine-tuned reference: every weight, the full model's budget."""
        return {**self.train_config(seed), "finetune": True, "tune_norms": False}

    @property
    def task_name(self) -> str:
        """What names the data: the task, or file:<name> for a user file."""
        return "file:" + os.path.basename(self.data_file) if self.data_file else self.task

    def params(self) -> dict:
        """The MLflow params: every field, the task as the data's name."""
        return {**dataclasses.asdict(self), "task": self.task_name}


@dataclass
class NightlyConfig:
    speedup_drop: float = option(0.10, "relative speed-up drop that counts as a regression (0.10 = 10%)")
    accuracy_drop: float = option(0.01, "absolute accuracy drop that counts as a regression (0.01 = 1 point)")
    repeats: int = option(20, "timed rounds per model")
    experiment: str = option("skeleton-nightly", "MLflow experiment of the nightly runs")

    def __post_init__(self):
        from skeleton.regression import Thresholds

        Thresholds(self.speedup_drop, self.accuracy_drop)  # raises on a threshold outside [0, 1)
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")


# ---- what derives from the fields ---------------------------------------------------------------------------

def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _optional(kind):
    """T for `T | None`, else the type itself."""
    args = typing.get_args(kind)
    return next(a for a in args if a is not type(None)) if type(None) in args else kind


def flow_parameters(cls):
    """Decorator: give `fn(**params)` the fields of `cls` as keyword parameters, which Prefect reads for the flow's
    parameter schema, its validation and the UI form, and the help texts as its docstring's Args."""
    def decorate(fn):
        hints = typing.get_type_hints(cls)
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_default(f), annotation=hints[f.name])
             for f in fields(cls)], return_annotation=list[dict])
        fn.__doc__ = (inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" +
                      "\n".join(f"    {f.name}: {f.metadata['help']}" for f in fields(cls)))
        return fn
    return decorate


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """A --dashed-name option per field. Options not given stay out of the namespace (argparse.SUPPRESS), so
    the fields' own defaults apply to them."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind, default = _optional(hints[f.name]), _default(f)
        shown = ("the backbone family's" if f.metadata["family"] else
                 " ".join(map(str, default)) or "none" if isinstance(default, list) else default)
        help = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        spec = dict(default=argparse.SUPPRESS, help=help)
        if kind is bool:
            spec["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            spec.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            spec["type"] = kind
        parser.add_argument("--" + f.name.replace("_", "-"), **spec)


def from_options(cls, namespace: argparse.Namespace):
    """The configuration of the options given (the others keep the field defaults)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})
