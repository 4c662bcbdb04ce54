"""The sweep's (and the nightly run's) parameters, declared once, and the stage specs the sweep runs.

Each field of `SweepConfig` is one parameter: its name, type, default and help text. The Prefect flow's
parameters (`flow_parameters`), the command-line options (`add_options`), the MLflow params (`params`) and the
tests' helper all derive from the fields, so adding a parameter is adding one field here. The configuration then
builds every stage's spec (skeleton/specs.py: `data_spec`, `tune_spec`, `build_spec`, ...), training settings as
skeleton.train.TrainConfig, so the flow passes specs and never retypes a parameter.

A field whose default is None takes the backbone family's value (FAMILY_DEFAULTS): budgets differ between a
small encoder and a decoder whose step costs ~8x more. `resolved()` fills them in. Plain Python at import time
(the command line's --help must not load torch); checks that need the library import it when a configuration is
built.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from flows.search import check_max_drop
from skeleton.specs import AttributeSpec, BenchmarkSpec, BuildSpec, DataSpec, EvalSpec, ProbeSpec, TeacherSpec, TuneSpec
from tasks.results import BENCHMARK_BATCH_SIZES, Measured

SPLIT_SEED = 0  # the train/validation/test split stays the same whatever the training seeds
_BUDGETS = {"methods": ["grad_x_act", "random"], "reconstruct": False, "tune_norms": False, "retune_norms": False,
            "train_steps": 800, "train_evals": 8, "retune_steps": 300, "retune_evals": 3,
            "attribution_examples": 1024, "prompt_methods": ["input"]}
# What a sweep parameter left unset (a field with family=True) means for the backbones of each architecture family
# (skeleton.backbones.FAMILIES): budgets in optimizer steps and examples, sized so a default sweep of a MiniLM-sized
# encoder takes about 15 minutes on 2 CPU cores. Every family needs every such field (a test checks).
FAMILY_DEFAULTS = {
    # A prefix beat the input prompt on MiniLM's validation, full model and skeletons alike (docs/results.md)
    "bert": {**_BUDGETS, "prompt_methods": ["prefix"]},
    # A smollm2 step costs ~8x MiniLM's: smaller budgets; reconstruction and re-tuned norms recover most of what
    # its cut FFNs lose (docs/results.md).
    "llama": {**_BUDGETS, "methods": ["grad_x_act"], "reconstruct": True, "retune_norms": True, "train_steps": 120,
              "train_evals": 1, "retune_steps": 120, "retune_evals": 1, "attribution_examples": 256},
}


def option(default, help: str, family: bool = False):
    """A configuration field with its help text. family=True: None means the backbone family's value
    (FAMILY_DEFAULTS). Lists get a fresh copy per instance."""
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
    reconstruct_damping: float = option(0.01, "ridge of --reconstruct's least squares, times the mean kept variance")
    target_speedups: list[float] = option([], "joint-budget points: cut FFN neurons and heads until the "
                                          "multiply-adds fall by this factor (e.g. 2.0); the mix with the lowest "
                                          "validation loss before re-tuning is kept")
    max_drop: float | None = option(None, "accuracy budget, in points of validation accuracy: also search the "
                                    "pruning rate (and the prompt method) for the fastest skeleton at most this far "
                                    "below the best full model, e.g. 1.0 (flows/search.py)")
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
    device: str = option("auto", "where every stage runs its models: cpu, cuda, cuda:N, or auto (the first GPU if "
                         "torch sees one, else the CPU); recorded with the run and in the stages' cache keys")
    data_file: str | None = option(None, "your own CSV / JSONL / Parquet file instead of --task")
    text_column: str = option("text", "text column of --data-file")
    label_column: str = option("label", "label column of --data-file")
    experiment: str = option("skeleton", "MLflow experiment name")

    def __post_init__(self):
        # The library's own checks (imported here: they load torch), so a bad value fails before any work.
        from skeleton.budget import check_target_speedup
        from skeleton.model import check_prompt_method
        from skeleton.selection import check_allocation, check_head_rate, check_rate
        from skeleton.train import check_precision

        self.rates = [check_rate(r) for r in self.rates]
        self.head_rates = [check_head_rate(r) for r in self.head_rates]
        self.target_speedups = [check_target_speedup(t) for t in self.target_speedups]
        check_allocation(self.allocation)
        check_precision(self.precision)
        check_max_drop(self.max_drop)
        if self.prompt_methods is not None and not self.prompt_methods:
            raise ValueError("prompt_methods must name at least one prompt method, e.g. [input] or [input, prefix]")
        for name in self.prompt_methods or []:
            check_prompt_method(name)
        if not self.seeds:
            raise ValueError("seeds must name at least one seed, e.g. [0] or [0, 1, 2]")
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"seeds must be non-negative, got {min(self.seeds)}: e.g. [0] or [0, 1, 2]")
        if not self.data_file:  # a packaged task has its own columns: a column named for it would be ignored
            for f in fields(self):
                if f.name in ("text_column", "label_column") and getattr(self, f.name) != f.default:
                    raise ValueError(f"{f.name} names a column of data_file, and no data_file is given: drop "
                                     f"{f.name}, or give data_file")
        for name in ("train_evals", "retune_evals", "prompt_length", "max_length", "benchmark_repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def resolved(self) -> SweepConfig:
        """A copy with every family field left None set to the backbone family's value, 'all' methods expanded,
        names checked against their registries and every stage spec built once (each checks its values): an
        unknown backbone or method, or a bad budget, fails here, before any work."""
        from skeleton.attribution import METHODS, scores_heads
        from skeleton.backbones import backbone_config, family_name
        from skeleton.train import resolve_device, resolve_precision

        family = family_name(self.backbone)
        if family not in FAMILY_DEFAULTS:
            raise ValueError(f"no sweep defaults for the {family!r} backbone family: add them to FAMILY_DEFAULTS in "
                             "flows/config.py")
        defaults = FAMILY_DEFAULTS[family]
        positions = backbone_config(self.backbone).get("max_position_embeddings")
        if positions and self.max_length + self.prompt_length > positions:
            raise ValueError(f"max_length {self.max_length} + prompt_length {self.prompt_length} exceed the {positions} "
                             f"positions of backbone {self.backbone!r}: use max_length "
                             f"{positions - self.prompt_length} or less")
        config = dataclasses.replace(self, **{f.name: copy.deepcopy(defaults[f.name]) for f in fields(self)
                                              if f.metadata["family"] and getattr(self, f.name) is None})
        # this machine's: the sweep's runs record what ran
        device = resolve_device(self.device)
        config.device, config.precision = str(device), resolve_precision(self.precision, device)
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
            config.tune_spec("", seed, "input")
            config.finetune_spec("", seed)
            for point in config.points():
                config.build_spec("", "", "", point, seed)
        return config

    # ---- the training settings and stage specs of a resolved configuration ----------------------------------

    def train_config(self, seed: int):
        """skeleton.train.TrainConfig of the full model's prompt tuning."""
        from skeleton.train import TrainConfig

        return TrainConfig(steps=self.train_steps, eval_every=max(1, self.train_steps // self.train_evals), seed=seed,
                           precision=self.precision, tune_norms=self.tune_norms)

    def retune_config(self, seed: int):
        """skeleton.train.TrainConfig of each skeleton's re-tuning."""
        from skeleton.train import TrainConfig

        return TrainConfig(steps=self.retune_steps, warmup_steps=10,
                           eval_every=max(1, self.retune_steps // self.retune_evals), distill=self.distill,
                           precision=self.precision, tune_norms=self.retune_norms, seed=seed,
                           distill_hidden=self.distill_hidden, patience=self.retune_patience)

    def finetune_config(self, seed: int):
        """skeleton.train.TrainConfig of the fine-tuned reference: every weight, the full model's budget."""
        return dataclasses.replace(self.train_config(seed), finetune=True, tune_norms=False)

    def data_spec(self) -> DataSpec:
        """The data, split with SPLIT_SEED whatever the training seeds; a user file by its path and its content."""
        path = self.data_file and str(Path(self.data_file).resolve())
        return DataSpec(self.task_name, self.backbone, self.max_length, SPLIT_SEED, path, self.text_column,
                        self.label_column, file_hash(self.data_file))

    def probe_spec(self, data: str, seed: int) -> ProbeSpec:
        return ProbeSpec(data, self.backbone, seed, self.precision, device=self.device)

    def tune_spec(self, data: str, seed: int, prompt: str) -> TuneSpec:
        """The full model of a prompt method."""
        return TuneSpec(data, self.backbone, self.prompt_length, self.train_config(seed), prompt, device=self.device)

    def finetune_spec(self, data: str, seed: int) -> TuneSpec:
        """The fine-tuned reference: the head alone on top, every backbone weight trained."""
        return TuneSpec(data, self.backbone, 0, self.finetune_config(seed), device=self.device)

    def attribute_spec(self, data: str, model: str, method: str, seed: int) -> AttributeSpec:
        return AttributeSpec(data, model, method, self.attribution_examples, seed, device=self.device)

    def teacher_spec(self, data: str, model: str) -> TeacherSpec:
        return TeacherSpec(data, model, device=self.device)

    def eval_spec(self, data: str, model: str) -> EvalSpec:
        return EvalSpec(data, model, device=self.device)

    def points(self) -> list[Point]:
        """Every sweep point of a full model: per method, each FFN rate x head rate, and each joint-budget target."""
        points = [Point(m, r, h) for m in self.methods for r in self.rates for h in self.head_rates]
        return points + [Point(m, 0.0, 0.0, t) for m in self.methods for t in self.target_speedups]

    def build_spec(self, data: str, model: str, scores: str, point: Point, seed: int,
                   teacher: str | None = None) -> BuildSpec:
        """A point's skeleton, cut from `model` by `scores`."""
        return BuildSpec(data, model, scores, point.rate, self.retune_config(seed), teacher, point.head_rate,
                         self.allocation, self.reconstruct, point.target, damping=self.reconstruct_damping,
                         device=self.device)

    def benchmark_spec(self, measured: Measured) -> BenchmarkSpec:
        """The sweep's latency benchmark (tasks.results.to_measure: what it measures), at max_length text tokens."""
        return BenchmarkSpec(measured.reference, tuple(measured.measured), BENCHMARK_BATCH_SIZES, (self.max_length,),
                             self.benchmark_repeats, tuple(measured.baselines), device=self.device)

    @property
    def task_name(self) -> str:
        """What names the data: the task, or file:<name> for a user file."""
        return "file:" + os.path.basename(self.data_file) if self.data_file else self.task

    def params(self) -> dict:
        """The MLflow params: every field, the task as the data's name."""
        return {**dataclasses.asdict(self), "task": self.task_name}


class Point(NamedTuple):
    """A sweep point: a selection method at an FFN rate and head rate, or at a joint-budget target speed-up."""
    method: str
    rate: float
    head_rate: float
    target: float | None = None


def file_hash(path: str | None) -> str | None:
    """A user file's content hash, so editing the file invalidates the cached data stage."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class NightlyConfig:
    speedup_drop: float = option(0.10, "relative speed-up drop that counts as a regression (0.10 = 10%)")
    accuracy_drop: float = option(0.01, "absolute accuracy drop that counts as a regression (0.01 = 1 point)")
    repeats: int = option(20, "timed rounds per model")
    experiment: str = option("skeleton-nightly", "MLflow experiment of the nightly runs")
    device: str = option("auto", "where the reference skeletons run: cpu, cuda, cuda:N, or auto (the first GPU if "
                         "torch sees one); compare nights of one device with a baseline measured on it")

    def __post_init__(self):
        from skeleton.regression import Thresholds
        from skeleton.train import resolve_device

        Thresholds(self.speedup_drop, self.accuracy_drop)  # raises on a threshold outside [0, 1)
        resolve_device(self.device)  # raises on a device this machine does not have
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
