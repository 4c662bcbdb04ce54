"""Real skeletons made by the sweep's stages on the tiny test backbone, one per task (tests of the MLflow models)."""
import random
from pathlib import Path

import pandas as pd
import torch

WORDS = ["great", "dull", "moving", "awful", "sharp", "flat", "funny", "stale", "bold", "tender"]


def task_file(folder: Path, task: str, labels: int, seed: int) -> Path:
    """A CSV whose label is a word the text contains: `labels` classes, 60 rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(60):
        label = i % labels
        rows.append({"text": f"{task} {i}: a {WORDS[label]} {rng.choice(WORDS)} story", "label": f"{task}{label}"})
    path = folder / f"{task}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def stage_expert(root: Path, backbone: str, task: str, labels: int, rate: float, seed: int = 0) -> str:
    """data -> prompt tuning -> attribution -> skeleton at `rate` (the full model itself at rate 0): its folder."""
    from skeleton import stages
    from skeleton.specs import AttributeSpec, BuildSpec, DataSpec, TuneSpec
    from skeleton.train import TrainConfig

    root = Path(root) / task
    root.mkdir(parents=True, exist_ok=True)
    data = stages.prepare_data(root / "data", DataSpec(task, backbone, max_length=16,
                                                       data_file=str(task_file(root, task, labels, seed))))
    train = TrainConfig(steps=2, batch_size=8, eval_every=2, warmup_steps=1, seed=seed)
    full = stages.tune_prompt(root / "full", TuneSpec(data["path"], backbone, 3, train))
    if rate == 0:
        return full["path"]
    scores = stages.attribute(root / "scores", AttributeSpec(data["path"], full["path"], "grad_x_act", examples=16))
    return stages.build_skeleton(root / "skeleton", BuildSpec(data["path"], full["path"], scores["path"], rate,
                                                              train))["path"]


def folder_probabilities(folder, texts):
    """The exported folder's own answer, one text at a time (no padding)."""
    from skeleton.folder import SkeletonFolder

    model, tokenizer, record = SkeletonFolder(folder).load()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer([text], truncation=True, max_length=record["max_length"], return_tensors="pt")
            out.append(torch.softmax(model(enc["input_ids"], enc["attention_mask"]), -1)[0].tolist())
    return out, model.config.label_names
