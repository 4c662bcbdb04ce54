"""Bad input, all of it: the command line, user files, flow parameters, skeleton folders and serving requests.

On the command line each case prints one line naming the problem and the fix and exits 2, with no traceback,
before any work: no MLflow run, no stage folder, nothing left in the working folder.
"""
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers import tiny_bert_config

ROOT = Path(__file__).resolve().parents[1]

PROGRESS = re.compile(r"\d+/\d+ \[")  # a progress bar on stderr (loading weights) is not a message

# (argv after the data options, words the one line must hold); argv that names a --task goes without the data file
SWEEP = [
    (["--rates", "0.5", "1.5"], ["pruning rate must be in [0, 1), got 1.5"]),
    (["--rates", "-0.1"], ["pruning rate must be in [0, 1), got -0.1"]),
    (["--head-rates", "1.0"], ["head pruning rate must be in [0, 1)"]),
    (["--methods", "grad_x_actt"], ["unknown selection method 'grad_x_actt'", "grad_x_act"]),
    (["--backbone", "/no/such/folder"], ["unknown backbone '/no/such/folder'"]),
    (["--allocation", "diagonal"], ["diagonal", "uniform"]),
    (["--precision", "fp16"], ["precision must be one of fp32, bf16, auto, got 'fp16'"]),
    (["--prompt-length", "0"], ["prompt_length must be at least 1, got 0"]),
    (["--train-steps", "0"], ["steps", "must be positive"]),
    (["--max-length", "0"], ["max_length must be at least 1, got 0"]),
    (["--distill", "2"], ["distill must be in [0, 1]"]),
    (["--target-speedups", "0.5"], ["target speed-up must be above 1, got 0.5"]),
    (["--text-column", "body"], ["column 'body' not found", "review"]),
    (["--device", "cuda:7"], ["device 'cuda:7' asked for, but torch", "or auto"]),
    (["--device", "tpu"], ["device must be auto, cpu, cuda or cuda:N, got 'tpu'"]),
    (["--max-drop", "-1"], ["max_drop must be a number of accuracy points from 0 to 100", "got -1.0"]),
    (["--max-drop", "nan"], ["max_drop must be a number of accuracy points from 0 to 100", "got nan"]),
    (["--max-drop", "101"], ["max_drop must be a number of accuracy points from 0 to 100", "got 101.0"]),
    (["--max-length", "100000"], ["max_length 100000 + prompt_length 20 exceed the 128 positions of backbone",
                                  "use max_length 108 or less"]),
    (["--dask", "tcp://127.0.0.1:1"], ["no Dask scheduler answers at tcp://127.0.0.1:1", "--dask local:N"]),
    (["--dask", "local:0"], ["--dask local:N needs N >= 1 workers, got 'local:0'"]),
    (["--seeds", "0", "-1"], ["seeds must be non-negative, got -1"]),
    (["--task", "rotten_tomatoes", "--text-column", "foo"], ["text_column names a column of data_file",
                                                              "drop text_column, or give data_file"]),
]

# (file name, content: text, bytes, or a DataFrame written in the file's format; words)
FILES = [
    ("missing.csv", None, ["data file not found", "check data_file"]),
    ("folder.csv", "folder", ["is a folder", "point data_file at"]),
    ("data.txt", "review,sentiment\na,b\n", ["unsupported file type", ".csv"]),
    ("empty.csv", "", ["is empty (0 bytes)"]),
    ("header.csv", "review,sentiment\n", ["has no rows", "add labelled rows"]),
    ("latin1.csv", "review,sentiment\ncaf\xe9 cr\xe8me,pos\n".encode("latin-1"), ["not UTF-8", "iconv"]),
    ("corrupt.parquet", b"PAR1 not really parquet" * 4, ["could not read", "Parquet"]),
    ("broken.jsonl", '{"review": "a", "sentiment":\n', ["could not read", "JSON"]),
    ("null.jsonl", [("good film", "pos"), ("bad film", None)], ["row 2 has no label", "label those rows"]),
    ("blank-label.csv", [("good film", "pos"), ("bad film", " ")], ["row 2 has no label"]),
    ("nan-label.csv", [("good film", "NaN"), ("bad film", "neg")], ["row 1 has no label"]),
    ("blank-text.csv", [("good film", "pos"), ("", "neg")], ["row 2 has an empty text", "fill in"]),
    ("one-class.csv", [(f"film {i}", "pos") for i in range(10)], ["only one class ('pos')", "add examples"]),
    ("one-row.csv", [("good film", "pos")], ["only one class"]),
    ("rare.csv", [(f"film {i}", "pos") for i in range(5)] + [(f"movie {i}", "neg") for i in range(5)] +
     [("odd one", "meh")], ["class 'meh' has only 1 example", "add examples of it"]),
    ("conflict.csv", [("good film", "pos"), ("good film", "neg"), ("fine", "pos")],
     ["'good film' has labels ['neg', 'pos']", "give each text one label"]),
    ("huge.csv", [("word " * 30_000, "pos"), ("bad film", "neg")], ["row 1 has a text over 100,000 characters"]),
]


def write(path: Path, content):
    if content == "folder":
        path.mkdir()
    elif isinstance(content, list):
        df = pd.DataFrame(content, columns=["review", "sentiment"])
        df.to_json(path, orient="records", lines=True) if path.suffix == ".jsonl" else df.to_csv(path, index=False)
    elif content is not None:
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def mlflow_runs() -> int:
    db = os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("select name from sqlite_master where type='table'")}
        return con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


def state() -> tuple:
    """What work would leave behind: stage folders, and MLflow runs."""
    from tasks.paths import artifacts_dir

    root = artifacts_dir()
    return sorted(str(p) for p in root.rglob("*")) if root.exists() else [], mlflow_runs()


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run `skeleton ARGV` in a fresh working folder; returns the single stderr line after checking exit 2, no
    traceback, and nothing made."""
    from flows.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def run(*argv: str) -> str:
        before = state()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit.value.code == 2, err
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]
        assert "Traceback" not in err and len(lines) == 1, err
        assert state() == before and not list(work.iterdir())
        return lines[0]
    return run


@pytest.mark.parametrize("argv, words", SWEEP, ids=[" ".join(a) for a, _ in SWEEP])
def test_command_line(cli, tiny_backbone_dir, reviews_csv, argv, words):
    data = [] if "--task" in argv else ["--data-file", str(reviews_csv), "--text-column", "review", "--label-column",
                                        "sentiment"]
    line = cli("sweep", "--backbone", str(tiny_backbone_dir), *data, *argv)
    assert line.startswith("skeleton sweep: error: ") and all(w in line for w in words), line


def test_unknown_task(cli):
    line = cli("sweep", "--task", "sst3")
    assert "unknown task 'sst3'" in line and "rotten_tomatoes" in line and "data_file" in line


@pytest.mark.parametrize("name, content, words", FILES, ids=[f[0] for f in FILES])
def test_user_file(cli, tiny_backbone_dir, tmp_path, name, content, words):
    path = write(tmp_path / name, content)
    line = cli("sweep", "--backbone", str(tiny_backbone_dir), "--data-file", str(path), "--text-column", "review",
               "--label-column", "sentiment")
    assert all(w in line for w in words), line


def test_unreadable_file(tmp_path, reviews_csv):
    """In a process of its own: as root (CI containers) it runs without the capabilities that bypass file
    permissions (setpriv), so a mode-000 file is unreadable there too."""
    path = tmp_path / "secret.csv"
    path.write_bytes(reviews_csv.read_bytes())
    path.chmod(0)
    work = tmp_path / "work"
    work.mkdir()
    before = state()
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    out = subprocess.run([*drop, sys.executable, "-m", "flows.cli", "sweep", "--data-file", str(path), "--text-column",
                          "review", "--label-column", "sentiment"], cwd=work, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in out.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert "permission denied" in lines[0] and "chmod a+r" in lines[0], lines
    assert state() == before and not list(work.iterdir())


def test_a_file_that_changes_between_two_runs_is_read_again(prefect_server, tiny_backbone_dir, tmp_path):
    """The data stage is cached by the file's content, not its name: an edited file is never served stale."""
    from flows.config import file_hash
    from skeleton.specs import DataSpec
    from tasks import pipeline

    path = tmp_path / "changing.csv"
    sizes = []
    for n in (10, 20):
        write(path, [(f"good film {i}", "pos") for i in range(n)] + [(f"bad film {i}", "neg") for i in range(n)])
        data = pipeline.prepare_data(DataSpec("file:changing.csv", str(tiny_backbone_dir), 16, 0, str(path), "review",
                                              "sentiment", file_hash(str(path))))
        sizes.append(sum(data["split_sizes"].values()))
    assert sizes == [20, 40]


# ---- flow parameters: what `prefect deployment run skeleton/full-sweep -p ...` hands the flow ----------------

@pytest.mark.parametrize("parameters, words", [
    ({"rates": "half"}, ["rates"]),
    ({"seeds": [0, "x"]}, ["seeds"]),
])
def test_flow_parameters_of_the_wrong_type(parameters, words):
    from prefect.exceptions import ParameterTypeError

    from flows.sweep import full_sweep

    with pytest.raises(ParameterTypeError) as e:
        full_sweep.validate_parameters(parameters)
    assert all(w in str(e.value) for w in words), e.value


@pytest.mark.parametrize("parameters, words", [
    ({"rates": [1.5]}, "pruning rate must be in [0, 1), got 1.5"),
    ({"methods": ["nope"]}, "unknown selection method 'nope'"),
])
def test_flow_parameters_out_of_range_fail_the_run_before_any_work(prefect_server, parameters, words):
    from flows.sweep import full_sweep

    before = state()
    run = full_sweep(**parameters, return_state=True)
    assert run.is_failed() and words in run.message, run.message
    assert state() == before
    stored = json.loads(Path(run.data.metadata.storage_key).read_text())  # the exception, stored as JSON
    assert stored["__exc_type__"] in ("builtins.ValueError", "builtins.KeyError"), stored


# ---- skeleton folders and serving requests ---------------------------------------------------------------

@pytest.fixture
def expert(tiny_classifier, tiny_backbone_dir, tmp_path):
    from skeleton.folder import SkeletonFolder
    from skeleton.stages import full_keep

    model, tokenizer = tiny_classifier
    meta = {"rate": 0.0, "task": "reviews", "method": "full", "backbone": str(tiny_backbone_dir)}
    folder = SkeletonFolder.export(model, tokenizer, full_keep(model.backbone), tmp_path / "experts" / "reviews", meta)
    return folder.path


def classify(cli, folder, backbone, *texts, task="reviews-full-p0.0"):
    return cli("classify", "--skeletons", str(folder), "--task", task, "--backbone", str(backbone), *texts)


def test_skeleton_missing_a_file(cli, expert, tiny_backbone_dir):
    (expert / "adapter" / "adapter_model.safetensors").unlink()
    line = classify(cli, expert, tiny_backbone_dir, "a film")
    assert "adapter_model.safetensors is missing or corrupt" in line and "re-run the sweep" in line, line


def test_skeleton_with_wrong_shapes(cli, expert, tiny_backbone_dir):
    """Weights of the wrong shape under a manifest that matches them: refused by shape, not by checksum."""
    from safetensors.torch import load_file, save_file

    from skeleton.io import write_manifest

    weights = expert / "backbone" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "intermediate.dense.weight" in k)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    write_manifest(expert)
    line = classify(cli, expert, tiny_backbone_dir, "a film")
    assert "shape" in line or "size" in line, line


def test_expert_of_another_backbone(cli, expert, tmp_path, minilm_tokenizer):
    import torch
    from transformers import BertModel

    torch.manual_seed(1)  # same architecture, other weights: not a slice of this backbone
    other = tmp_path / "other-bert"
    BertModel(tiny_bert_config()).save_pretrained(other)
    minilm_tokenizer.save_pretrained(other)
    line = classify(cli, expert, other, "a film")
    assert "is not an expert of backbone" in line, line


def test_unknown_expert(cli, expert, tiny_backbone_dir):
    line = classify(cli, expert, tiny_backbone_dir, "a film", task="nope")
    assert "'nope' is not an expert here" in line and "reviews-full-p0.0" in line, line


def test_no_texts(cli, expert, tiny_backbone_dir, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert "no texts" in classify(cli, expert, tiny_backbone_dir)


def test_an_empty_text(cli, expert, tiny_backbone_dir):
    line = classify(cli, expert, tiny_backbone_dir, "a film", "  ")
    assert "text 2 is empty" in line, line
