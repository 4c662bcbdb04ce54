"""Skeletons as MLflow pyfunc models (models from code: this file is copied into each model and run on load).

Two kinds, told apart by their artifacts:
- one exported skeleton (artifact `skeleton`): input a column `text`; output `label` and `probabilities`
  (label -> probability), equal to the exported folder's own forward pass;
- a multi-task model (artifacts `backbone` and `expert-<task>`, one per task): one backbone in memory
  (skeleton.serve.SkeletonServer), input columns `task` and `text`, output `task`, `label`, `probabilities`;
  a mixed batch is grouped by task.

Bad requests (unknown task, empty text, too many rows, too long a text) raise an MlflowException whose message
names the problem, which `mlflow models serve` answers with HTTP 400. Only torch, transformers, MLflow and the
`skeleton` library are needed at serve time (no Prefect).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

CODE = Path(__file__)
MAX_ROWS = 256  # per request: a bigger batch is refused, not queued behind everyone else's
MAX_CHARS = 20_000  # per text; tokens past the expert's max_length are truncated anyway
EXPERT = "expert-"


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def check_texts(texts: list) -> list[str]:
    if len(texts) > MAX_ROWS:
        raise bad_request(f"request too large: {len(texts)} rows, at most {MAX_ROWS} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise bad_request(f"row {i}: field 'text' is empty or missing")
        if len(text) > MAX_CHARS:
            raise bad_request(f"row {i}: text of {len(text)} characters, at most {MAX_CHARS}")
    return texts


def rows(frame, columns: tuple[str, ...]) -> list[list]:
    """The request's columns as lists; a missing column is a bad request naming it."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise bad_request(f"missing field(s) {', '.join(map(repr, missing))}; each row needs {', '.join(columns)}")
    return [frame[c].tolist() for c in columns]


class SkeletonModel(PythonModel):
    def load_context(self, context):
        from skeleton.serve import SkeletonServer

        artifacts = context.artifacts
        if "skeleton" in artifacts:  # a single exported skeleton, loaded as it was saved
            self.server = None
            self.folder = Path(artifacts["skeleton"])
            from skeleton.folder import load_skeleton

            self.model, self.tokenizer, record = load_skeleton(self.folder)
            if self.tokenizer.pad_token is None:  # as load_backbone does for decoder tokenizers
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.tokenizer.padding_side = "right"
            self.max_length = int(record.get("max_length") or 64)
            names = self.model.config.label_names
            self.labels = list(names) if names else [str(i) for i in range(self.model.config.num_labels)]
            return
        # Sliced weights kept per expert: a switch is pointer swaps (~0.3 ms) rather than slicing on every request.
        self.server = SkeletonServer.load(artifacts["backbone"], cache_slices=True)
        for key, folder in sorted(artifacts.items()):
            if key.startswith(EXPERT):
                self.server.add(folder, name=key.removeprefix(EXPERT))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if self.server is None:
            (texts,) = rows(model_input, ("text",))
            return pd.DataFrame(self._classify(check_texts(texts)))
        tasks, texts = rows(model_input, ("task", "text"))
        check_texts(texts)
        unknown = sorted({str(t) for t in tasks} - set(self.server.names))
        if unknown:
            raise bad_request(f"unknown task(s) {', '.join(map(repr, unknown))}; served tasks: "
                              f"{', '.join(self.server.names)}")
        answers = self.server.serve(list(zip(tasks, texts)))
        return pd.DataFrame([{"task": a.task, "label": a.label, "probabilities": a.probabilities} for a in answers])

    def _classify(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i : i + batch_size], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt")
                probs = torch.softmax(self.model(enc["input_ids"], enc["attention_mask"]), -1).tolist()
                out += [{"label": self.labels[max(range(len(p)), key=p.__getitem__)],
                         "probabilities": dict(zip(self.labels, p))} for p in probs]
        return out


def _spec(artifacts: dict[str, str], columns: tuple[str, ...]) -> dict:
    """log_model / save_model arguments: this file as the model's code, the `skeleton` library beside it (so a
    container needs no checkout), explicit requirements (inferring them would load the model once more)."""
    import importlib.metadata as md

    import skeleton
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return {"python_model": str(CODE), "artifacts": artifacts, "code_paths": [str(Path(skeleton.__file__).parent)],
            "pip_requirements": [f"{p}=={md.version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors",
                                                                   "pandas")],
            "signature": ModelSignature(inputs=Schema([ColSpec("string", c) for c in columns]))}


def skeleton_model(folder: str | Path) -> dict:
    """log_model / save_model arguments for one exported skeleton folder."""
    return _spec({"skeleton": str(folder)}, ("text",))


def skeleton_in(model_dir: str | Path) -> Path:
    """The skeleton folder inside a downloaded (or saved) skeleton model."""
    from mlflow.models import Model

    artifacts = Model.load(str(model_dir)).flavors["python_function"].get("artifacts", {})
    if "skeleton" not in artifacts:
        raise ValueError(f"{model_dir} is not a skeleton model (its artifacts: {', '.join(artifacts) or 'none'})")
    return Path(model_dir) / artifacts["skeleton"]["path"]


def download_skeleton(uri: str, dst: str | Path) -> Path:
    """The skeleton folder of a logged skeleton model (`models:/<id>`, `models:/<name>@<alias>`, ...)."""
    return skeleton_in(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def registered_name(task: str) -> str:
    """The registered model holding a task's promoted skeletons: skeleton-<task> (file:x.csv -> skeleton-file-x-csv)."""
    import re

    return "skeleton-" + re.sub(r"[^A-Za-z0-9_-]+", "-", task).strip("-")


def expert_folder(task: str, source: str, dst: str | Path) -> Path:
    """A task expert's skeleton folder from a folder, a model URI (models:/...), or @alias: the task's registered
    model at that alias (e.g. @production)."""
    if source.startswith("@"):
        source = f"models:/{registered_name(task)}{source}"
    if source.startswith(("models:/", "runs:/")):
        return download_skeleton(source, Path(dst) / task)
    return Path(source)


def multitask_model(experts: dict[str, str | Path], backbone: str | Path | None = None) -> dict:
    """log_model / save_model arguments for one backbone and a task expert per entry of `experts` (task name ->
    skeleton folder). The backbone defaults to the one the first expert records (a registered name or a folder)."""
    from skeleton.backbones import resolve_backbone

    if not experts:
        raise ValueError("a multi-task model needs at least one task expert")
    if backbone is None:
        first = Path(next(iter(experts.values())))
        backbone = json.loads((first / "neurons.json").read_text()).get("backbone")
        if not backbone:
            raise ValueError(f"{first} does not record its backbone: pass backbone=")
    artifacts = {"backbone": str(resolve_backbone(str(backbone)))}
    artifacts.update({EXPERT + task: str(folder) for task, folder in experts.items()})
    return _spec(artifacts, ("task", "text"))


mlflow.models.set_model(SkeletonModel())
