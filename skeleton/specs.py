"""What each pipeline stage is asked to do: one frozen dataclass per stage, whose fields are its parameters.

A spec is built once (the sweep's by flows/config.py's SweepConfig, a test's by hand) and passed whole:
`skeleton.stages.run(out, spec)` runs its stage into the folder `out`, and the Prefect wrapper (tasks/pipeline.py)
names that folder and its cache entry by `spec.key()`, every field. So a new stage parameter is one field here and
its use in the stage; a training setting is a field of skeleton.train.TrainConfig, which the training stages hold.

    spec = BuildSpec(data, model, scores, rate=0.5, train=TrainConfig(steps=300), reconstruct=True)
    stages.run(Path("artifacts/skeletons/x"), spec)   # == stages.build_skeleton(out, spec)

Plain Python at import time (no torch): the command line and `prefect deploy` import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from skeleton.train import TrainConfig


@dataclass(frozen=True)
class StageSpec:
    name: ClassVar[str]  # the stage's name: its Prefect task, its log lines and failpoints
    folder: ClassVar[str]  # the artifacts subfolder its output folders go in

    def key(self) -> dict:
        """What the stage's output depends on: every field (a TrainConfig as its fields)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OnDevice(StageSpec):
    """A stage that runs a model: where (skeleton.train.resolve_device's answer). Part of the cache key: a GPU's
    results differ from the CPU's in the last bits, and bf16 autocast is the default there."""

    device: str = field(default="cpu", kw_only=True)  # keyword-only: after the fields of every subclass


@dataclass(frozen=True)
class ModelStage(OnDevice):
    """A stage on an exported model (a skeleton folder) and the data it was made with."""

    data: str  # a DataSpec's folder
    model: str  # a skeleton folder (skeleton.folder.SkeletonFolder): a full model or a skeleton


@dataclass(frozen=True)
class DataSpec(StageSpec):
    """A registered task (or a user's file) split, tokenized for the backbone and saved."""

    name, folder = "prepare-data", "data"
    task_name: str  # a registered task (skeleton.data.TASKS), or what names the user's file
    backbone: str  # registered name or checkpoint folder: its tokenizer
    max_length: int = 64  # text tokens per example (truncation)
    seed: int = 0  # of the train / validation / test split
    data_file: str | None = None  # a user's CSV / JSONL / Parquet file instead of the task
    text_column: str = "text"
    label_column: str = "label"
    data_file_hash: str | None = None  # the file's content: an edited file is new data


@dataclass(frozen=True)
class TuneSpec(OnDevice):
    """The full model: a prompt (and head) tuned on the frozen backbone, exported as a rate-0 skeleton. With
    train.finetune every backbone weight trains: the fine-tuned reference."""

    name, folder = "tune-prompt", "models"
    data: str
    backbone: str
    prompt_length: int  # prompt vectors (per layer for a prefix); 0: the head alone
    train: TrainConfig
    prompt_method: str = "input"  # skeleton.model.PROMPT_METHODS


@dataclass(frozen=True)
class ProbeSpec(OnDevice):
    """The linear probe: the head alone, trained to convergence on frozen, un-prompted features."""

    name, folder = "linear-probe", "probe"
    data: str
    backbone: str
    seed: int = 0
    precision: str = "fp32"  # of the frozen features' forward pass


@dataclass(frozen=True)
class AttributeSpec(ModelStage):
    """A score per FFN neuron (and per attention head, where the method and family can) of a full model."""

    name, folder = "attribute", "scores"
    method: str  # skeleton.attribution.METHODS
    examples: int = 1024  # training examples scored
    seed: int = 0  # which examples, and a random method's draw
    batch_size: int = 32


@dataclass(frozen=True)
class TeacherSpec(ModelStage):
    """The full model's logits on the training split: soft labels for re-tuning its skeletons."""

    name, folder = "teacher-logits", "teacher"


@dataclass(frozen=True)
class BuildSpec(ModelStage):
    """A skeleton: the top-scoring units of a full model (`model`) kept, the rest sliced out, re-tuned, exported."""

    name, folder = "build-skeleton", "skeletons"
    scores: str  # an AttributeSpec's scores.parquet
    rate: float  # share of FFN neurons cut
    train: TrainConfig  # the re-tuning
    teacher: str | None = None  # a TeacherSpec's logits: distillation when train.distill > 0
    head_rate: float = 0.0  # share of attention heads cut
    allocation: str = "uniform"  # how kept units spread over layers: skeleton.selection.ALLOCATIONS
    reconstruct: bool = False  # refit the kept neurons' down projections first (prune.reconstruct_ffn)
    target_speedup: float | None = None  # a joint budget (skeleton.budget) decides rate and head_rate instead
    calibration_examples: int = 256  # training examples whose activation statistics `reconstruct` fits
    damping: float = 0.01  # `reconstruct`'s ridge, times the mean kept variance (prune.reconstruct_ffn)

    def __post_init__(self):  # a bad value fails when the spec is made, before any work
        from skeleton.selection import check_allocation, check_head_rate, check_rate

        object.__setattr__(self, "rate", check_rate(self.rate))
        object.__setattr__(self, "head_rate", check_head_rate(self.head_rate))
        check_allocation(self.allocation)
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0 (0: plain least squares), got {self.damping}")


@dataclass(frozen=True)
class BenchmarkSpec(OnDevice):
    """Interleaved latency of model folders against a reference and baselines, in a fresh process."""

    name, folder = "benchmark-latency", "benchmark"
    full: str  # the reference model folder
    skeletons: tuple[str, ...]
    batch_sizes: tuple[int, ...] = (32,)
    lengths: tuple[int, ...] = (64,)  # text tokens (each model's prompt comes on top)
    repeats: int = 20  # timed rounds, every model once per round
    baselines: tuple[str, ...] = ()  # other folders every model is also compared with

    def __post_init__(self):
        for name in ("skeletons", "batch_sizes", "lengths", "baselines"):  # lists given: kept as tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class EvalSpec(ModelStage):
    """Test metrics of an exported model, loaded back from its folder."""

    name, folder = "evaluate", "eval"
