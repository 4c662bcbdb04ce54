"""Importing changes nothing: every module of skeleton/, tasks/ and flows/, imported in a fresh process in an order
that broke before this was so, leaves the environment, the library's logger and transformers' Auto classes as they
were, and fixes no folder: what reads the environment reads it when called."""
from pathlib import Path

from flows.settings import ENVIRONMENT
from helpers import run_fresh

ROOT = Path(__file__).resolve().parents[1]


def modules() -> list[str]:
    """Every module of the three packages, the flows first: flows.sweep used to import Prefect before tasks.pipeline
    set Prefect's JSON serializer (lost) and to set environment variables, tasks.pipeline to fix the results folder
    and hash the library, `import skeleton` to register model classes with transformers."""
    found = [".".join(p.relative_to(ROOT).with_suffix("").parts) for folder in ("flows", "tasks", "skeleton")
             for p in sorted((ROOT / folder).rglob("*.py"))]
    return [name.removesuffix(".__init__") for name in found]


def test_importing_every_module_changes_nothing(tmp_path):
    result = run_fresh(f"""
        import importlib, json, logging, os, sys
        for key in {sorted(ENVIRONMENT)!r}:  # as a fresh shell has it (telemetry stays off: MLflow writes an id)
            if key not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_OFFLINE"):
                os.environ.pop(key, None)
        os.environ["SKELETON_ARTIFACTS"] = {str(tmp_path / "first")!r}
        # What the libraries do on import is theirs (transformers' BERT code sets torch's TORCHINDUCTOR_CACHE_DIR);
        # Prefect first, as a deployment's flow run has it: the order that lost the JSON serializer.
        import prefect.main, mlflow, torch, transformers.models.bert.modeling_bert
        before = dict(os.environ)
        for name in {modules()!r}:
            importlib.import_module(name)
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        os.environ["SKELETON_ARTIFACTS"] = {str(tmp_path / "then")!r}  # set after the imports: still followed
        from tasks.paths import results_dir
        from tasks.pipeline import output_dir
        from skeleton.specs import EvalSpec
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        print(json.dumps({{"changed": changed, "level": logging.getLogger("skeleton").level,
                           "registered": "skeleton_bert" in CONFIG_MAPPING, "results": str(results_dir()),
                           "stage": str(output_dir(EvalSpec("d", "m")).parent)}}))
    """)
    assert result["changed"] == [] and result["level"] == 0 and result["registered"] is False
    assert result["results"] == str(tmp_path / "then" / ".prefect-results")
    assert result["stage"] == str(tmp_path / "then" / "eval")
