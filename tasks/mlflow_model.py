"""An exported skeleton as an MLflow pyfunc model (models from code: this file is copied into each model and run on
load): input a column `text`; output `label` and `probabilities` (label -> probability), equal to the exported
folder's own forward pass. `mlflow models serve` serves one; many task experts on one backbone are
`skeleton serve`'s (flows/commands/serve.py).

Bad requests (a missing column, empty text, too many rows, too long a text: skeleton.inputs) raise an
MlflowException whose message names the problem, which `mlflow models serve` answers with HTTP 400. Only torch,
transformers, MLflow and the `skeleton` library are needed at serve time (no Prefect).
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

CODE = Path(__file__)


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


class SkeletonModel(PythonModel):
    def load_context(self, context):
        from skeleton.serve import SkeletonServer

        # loaded as it was saved, on its own backbone
        self.server, self.name = SkeletonServer.of_folder(context.artifacts["skeleton"])

    # A DataFrame hint keeps the explicit `text` signature below (MLflow infers no schema from it, and warns
    # without a hint); list[str] would change the request format that `mlflow models serve` clients send.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from skeleton.inputs import check_texts

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "text" not in model_input.columns:
            raise bad_request("missing field 'text'; each row needs a text")
        texts = model_input["text"].tolist()
        try:
            check_texts(texts)
        except ValueError as e:
            raise bad_request(str(e)) from None
        answers = self.server.classify(self.name, texts)
        return pd.DataFrame([{"label": a.label, "probabilities": a.probabilities} for a in answers])


def skeleton_model(folder: str | Path) -> dict:
    """log_model / save_model arguments for one exported skeleton folder: this file as the model's code, the
    `skeleton` library beside it (so a container needs no checkout), explicit requirements (inferring them would load
    the model once more)."""
    import importlib.metadata as md

    import skeleton
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return {"python_model": str(CODE), "artifacts": {"skeleton": str(folder)},
            "code_paths": [str(Path(skeleton.__file__).parent)],
            "pip_requirements": [f"{p}=={md.version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors",
                                                                   "pandas")],
            "signature": ModelSignature(inputs=Schema([ColSpec("string", "text")])),
            # shown in the UI as the request to send; MLflow also serves it once from the logged copy, so a model
            # that cannot load or answer fails here, at logging time, not at a user's first request
            "input_example": pd.DataFrame({"text": ["a moving, funny and well made film"]})}


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


mlflow.models.set_model(SkeletonModel())
