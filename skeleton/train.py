"""Training and inference loops shared by prompt tuning, skeleton re-tuning and the linear probe."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from skeleton.backbones import norm_parameters
from skeleton.model import PromptClassifier

log = logging.getLogger("skeleton")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the hardware runs it natively (native_bf16)
PROGRESS_EVERY = 20  # steps between progress lines (a real-model step can take seconds)


@dataclass
class TrainConfig:
    steps: int = 600  # budgets are optimizer steps, never seconds
    batch_size: int = 32
    lr_prompt: float = 3e-2
    lr_head: float = 3e-3
    warmup_steps: int = 30
    eval_every: int = 100  # keep the adapter with the best validation accuracy
    seed: int = 0
    distill: float = 0.0  # weight of the teacher's soft labels (needs a "teacher" logits column); 0 = off
    temperature: float = 2.0
    precision: str = "fp32"  # "bf16": autocast the training forward/backward (evaluation stays float32)
    # also train the backbone's normalisation gains and biases (backbones.norm_parameters), at lr_head: lets a
    # skeleton's re-tuning rescale what its cut layers pass on; they are then part of the exported checkpoint
    tune_norms: bool = False
    # train every backbone weight too, at lr_backbone: full fine-tuning, the reference a user could pick instead
    finetune: bool = False
    lr_backbone: float = 5e-5
    # stop after this many validation checks without a new best (0: run every step of the budget)
    patience: int = 0
    # weight of layer-by-layer distillation from a teacher's hidden states (train(teacher=...)): the mean over
    # layers of the text positions' squared error, each layer scaled by the teacher's mean square there; 0 = off
    distill_hidden: float = 0.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(f"steps, batch_size and eval_every must be positive: {self}")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill must be in [0, 1] and temperature positive: {self}")
        if self.patience < 0 or self.distill_hidden < 0 or self.lr_backbone <= 0:
            raise ValueError(f"patience and distill_hidden must be >= 0 and lr_backbone positive: {self}")
        check_precision(self.precision)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU if torch sees one, else the CPU; "cpu", "cuda", "cuda:N" as given, checked."""
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from e
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but torch {torch.__version__} sees no CUDA device: "
                             "use cpu, or auto (a GPU where there is one)")
        if (resolved.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but torch {torch.__version__} sees "
                             f"{torch.cuda.device_count()} GPU(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}, "
                             "or auto")
    return resolved


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (the device its batches must go to)."""
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (the same tensors where they already are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def native_bf16(device: torch.device = torch.device("cpu")) -> bool:
    """Whether this machine computes bf16 in hardware. A CPU without AVX512-BF16 or AMX emulates it: bf16
    autocast made a MiniLM training step 30x slower on an AVX2-only AMD EPYC (45 s against 1.5 s in fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device = torch.device("cpu")) -> str:
    """fp32 or bf16: "auto" becomes bf16 where the hardware has it (native_bf16), fp32 elsewhere."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The arithmetic of a forward pass: bf16 autocast for "bf16" (parameters stay float32), plain float32 else."""
    return torch.autocast(device.type, torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


def collate(pad_id: int):
    """Pad a list of tokenized examples to the longest one in the batch."""

    def pad(examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}
        if "teacher" in examples[0]:
            out["teacher"] = torch.tensor([e["teacher"] for e in examples])
        return out

    return pad


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, pool: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length examples: a random pool of `pool` batches is sorted by length and
    cut into batches, then all batches are shuffled. Cuts padding (and step time) by about a third."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    out = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start : start + batch_size * pool], key=lambda i: lengths[i])
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def batches(dataset, pad_id: int, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches in dataset order, or (shuffle=True) length-bucketed random batches, new order each epoch."""
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate(pad_id))
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return DataLoader(dataset, batch_sampler=bucketed_batches(lengths, batch_size, seed), collate_fn=collate(pad_id))


def length_sorted(dataset, pad_id: int, batch_size: int = 64) -> DataLoader:
    """Batches of length-sorted examples (little padding); the loader's batch_sampler holds each batch's rows."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sampler = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate(pad_id))


@torch.no_grad()
def map_batches(fn, dataset, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """fn(batch) over length-sorted batches, concatenated back in dataset order, on the CPU (fn may compute on any
    device: its batches come on the CPU)."""
    loader = length_sorted(dataset, pad_id, batch_size)
    out = torch.cat([fn(b).cpu() for b in loader])
    result = torch.empty_like(out)
    result[torch.tensor([i for rows in loader.batch_sampler for i in rows])] = out
    return result


def predict(model: PromptClassifier, dataset, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, num_labels) in dataset order, on the CPU, computed where the model is."""
    model.eval()
    device = model_device(model)
    return map_batches(lambda b: model(b["input_ids"].to(device), b["attention_mask"].to(device)), dataset, pad_id,
                       batch_size)


def accuracy(logits: torch.Tensor, labels) -> float:
    return (logits.argmax(-1) == torch.as_tensor(labels)).float().mean().item()


def objective(logits: torch.Tensor, batch: dict, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the gold labels, mixed with distillation from the teacher's logits when given."""
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    if config.distill == 0.0:
        return loss
    if "teacher" not in batch:
        raise ValueError("distill > 0 needs teacher logits: a 'teacher' column in the training set")
    t = config.temperature
    soft = torch.nn.functional.kl_div(torch.log_softmax(logits / t, -1), torch.log_softmax(batch["teacher"] / t, -1),
                                      log_target=True, reduction="batchmean") * t * t
    return (1 - config.distill) * loss + config.distill * soft


def hidden_distillation(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the text positions' squared error, each layer's divided by the teacher's mean square
    there (so every layer weighs alike whatever its scale). States: per layer (B, T, d); mask (B, T)."""
    weight = mask.unsqueeze(-1).to(student[0].dtype)
    losses = [(((s - t) ** 2) * weight).sum() / ((t ** 2) * weight).sum().clamp(min=1e-12)
              for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def train(model: PromptClassifier, train_set, val_set, pad_id: int, config: TrainConfig,
          teacher: PromptClassifier | None = None) -> dict:
    """Tune the prompt and head (with config.tune_norms also the backbone's normalisation layers, with
    config.finetune every backbone weight; else the backbone stays frozen). With config.distill_hidden, `teacher`
    (the full model a skeleton was cut from) gives the hidden states the student's should match, layer by layer.
    Runs where the model is (batches follow it; a teacher must be on the same device), with config.precision's
    arithmetic there ("auto": bf16 autocast on a GPU). Returns a small record of the run."""
    torch.manual_seed(config.seed)
    if config.distill_hidden and teacher is None:
        raise ValueError("distill_hidden > 0 needs a teacher model (the full model the skeleton was cut from)")
    trained = dict(model.backbone.named_parameters()) if config.finetune else (
        norm_parameters(model.backbone) if config.tune_norms else {})
    for parameter in trained.values():
        parameter.requires_grad_(True)
    groups = [{"params": list(model.prompt.parameters()), "lr": config.lr_prompt},
              {"params": model.head_parameters(), "lr": config.lr_head}]
    if trained:
        groups.append({"params": list(trained.values()), "lr": config.lr_backbone if config.finetune else config.lr_head})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)

    def snapshot() -> dict[str, torch.Tensor]:
        return {**{k: v.clone() for k, v in model.adapter_state().items()},
                **{f"backbone.{k}": v.detach().clone() for k, v in trained.items()}}

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    best = {"val_accuracy": -1.0, "step": 0}
    best_state = None
    step, running, epoch, stale = 0, 0.0, 0, 0
    device = model_device(model)
    while step < config.steps and (not config.patience or stale < config.patience):
        epoch += 1
        for batch in batches(train_set, pad_id, config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch):
            batch = to_device(batch, device)
            model.train()
            with autocast(config.precision, device):
                if config.distill_hidden:
                    logits, states, mask = model.layer_states(batch["input_ids"], batch["attention_mask"])
                    with torch.no_grad():
                        _, targets, _ = teacher.layer_states(batch["input_ids"], batch["attention_mask"])
                else:
                    logits = model(batch["input_ids"], batch["attention_mask"])
            loss = objective(logits.float(), batch, config)
            if config.distill_hidden:
                loss = loss + config.distill_hidden * hidden_distillation(
                    [s.float() for s in states], [t.float() for t in targets], mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            running += loss.item()
            if step % PROGRESS_EVERY == 0 and step % config.eval_every:
                log.info("step %d/%d  loss %.4f", step, config.steps, loss.item())
            if step % config.eval_every == 0 or step == config.steps:
                val_acc = accuracy(predict(model, val_set, pad_id), val_set["label"])
                n = config.eval_every if step % config.eval_every == 0 else step % config.eval_every
                log.info("step %d/%d  loss %.4f  val_accuracy %.4f", step, config.steps, running / n, val_acc)
                running = 0.0
                if val_acc > best["val_accuracy"]:
                    best = {"val_accuracy": val_acc, "step": step}
                    best_state = snapshot()
                    stale = 0
                else:
                    stale += 1
            if step >= config.steps or (config.patience and stale >= config.patience):
                break
    model.load_adapter_state(best_state)
    with torch.no_grad():
        for name, parameter in trained.items():
            parameter.copy_(best_state[f"backbone.{name}"]).requires_grad_(False)
    return {**best, "steps": step}
