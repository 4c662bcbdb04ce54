"""The installed `skeleton` command: every subcommand answers --help, errors are one line, --help stays light.
In-process through flows.cli.main (what the console script calls), except where the installed script itself or a
fresh interpreter is the point."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from helpers import run_fresh
from helpers import run_skeleton as skeleton
from tasks.queries import IS_SWEEP

HELP = [["sweep"], ["nightly"], ["nightly", "run"], ["nightly", "promote"], ["benchmark"], ["list"], ["classify"],
        ["serve"], ["promote"], ["serve-bench"], ["load-bench"], ["stack"], ["verify"], ["gc"]]


def test_the_command_is_installed_and_lists_every_subcommand():
    command = Path(sys.executable).with_name("skeleton")  # the console script `pip install -e .` put beside python
    out = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in {argv[0] for argv in HELP}:
        assert f"    {name}" in out.stdout


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_every_subcommand_answers_help(capsys, argv):
    code, out, err = skeleton(capsys, *argv, "--help")
    assert code == 0, err
    # experts.py names its own subcommands (list, classify) after the prog "skeleton"
    assert out.startswith(f"usage: skeleton {' '.join(argv)}"), out[:200]


def test_sweep_options_are_the_config_fields(capsys):
    from dataclasses import fields

    from flows.config import SweepConfig

    out = skeleton(capsys, "sweep", "--help")[1]
    for f in fields(SweepConfig):
        assert f"--{f.name.replace('_', '-')}" in out
    assert "--reconstruct, --no-reconstruct" in out and "(default: the backbone family's)" in out


def test_help_imports_neither_torch_nor_prefect():
    loaded = run_fresh("""
        import contextlib, io, json, sys
        from flows.cli import main
        for argv in (["--help"], ["sweep", "--help"], ["nightly", "run", "--help"], ["stack", "--help"],
                     ["list", "--help"], ["classify", "--help"], ["gc", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main(argv)
        print(json.dumps(sorted(m for m in ("torch", "prefect", "mlflow", "transformers") if m in sys.modules)))
    """)
    assert loaded == []


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--rates", "0.5", "1.5"], "pruning rate must be in [0, 1), got 1.5"),
    (["sweep", "--methods", "grad_x_actt"], "unknown selection method 'grad_x_actt'; known: "),
    (["sweep", "--backbone", "/no/such/folder"], "unknown backbone '/no/such/folder'"),
    (["sweep", "--precision", "fp16"], "precision must be one of fp32, bf16, auto, got 'fp16'"),
    (["sweep", "--seeds", "0", "--train-evals", "0"], "train_evals must be at least 1, got 0"),
    (["sweep", "--benchmark-repeats", "0"], "benchmark_repeats must be at least 1, got 0"),
    (["nightly", "run", "--speedup-drop", "1.5"], "thresholds must be in [0, 1)"),
    (["nightly", "promote", "--latest", "--experiment", "no-such-experiment"], "no finished sweep in MLflow"),
    (["verify", "/no/such/results.parquet"], "/no/such/results.parquet: no such file"),
])
def test_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = skeleton(capsys, *argv)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith(f"skeleton {argv[0]}: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err  # (library logs may precede)


def test_debug_raises_the_exception_itself(monkeypatch):
    """--debug lets the exception through, so Python prints its traceback."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the defaults main sets stay in this test
    with pytest.raises(ValueError, match=r"pruning rate must be in \[0, 1\)"):
        main(["--debug", "sweep", "--rates", "1.5"])


def test_usage_errors_stay_argparse_errors(capsys):
    code, _, err = skeleton(capsys, "sweep", "--rates", "half")
    assert code == 2 and "argument --rates: invalid float value: 'half'" in err and "Traceback" not in err


def test_sweep_command_runs_the_flow_with_the_options_given(prefect_server, tiny_backbone_dir, reviews_csv):
    """The installed `skeleton sweep` with the tests' tiny sweep as options (on the session's Prefect server, as
    with PREFECT_API_URL set): the flow runs, MLflow records what was given and the family defaults of what was not."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from helpers import sweep_args, sweep_options
    from flows.config import FAMILY_DEFAULTS

    argv = [str(Path(sys.executable).with_name("skeleton")), "sweep",
            *sweep_options(sweep_args(tiny_backbone_dir, reviews_csv, methods=["random"], experiment="cli"))]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOAD_FAST" not in out.stdout + out.stderr  # no bytecode listings (datasets' dill) in the sweep's logs
    for bar in ("Loading weights", "Writing model shards", "Downloading artifacts"):  # a bar per model load or log
        assert bar not in out.stderr, f"{bar!r} progress bars in the sweep's output"
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id], IS_SWEEP)
    assert run.info.status == "FINISHED"
    assert (run.data.params["train_steps"], run.data.params["methods"]) == ("6", "['random']")
    assert run.data.params["retune_evals"] == str(FAMILY_DEFAULTS["bert"]["retune_evals"])
    with get_client(sync_client=True) as prefect:  # the flow run is on the server the command was pointed at
        assert any(r.parameters.get("experiment") == "cli" and r.state.is_completed() for r in prefect.read_flow_runs())
