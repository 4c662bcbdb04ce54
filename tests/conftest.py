import atexit
import os
import shutil
import signal
import tempfile

# First, as the `skeleton` command does first: the session writes artifacts and MLflow runs to a scratch folder,
# removed at exit (each session leaves about 180 MB otherwise), and TMPDIR points there before any library asks.
SCRATCH = tempfile.mkdtemp(prefix="skeleton-tests-")
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
# A session stopped by SIGTERM (a CI timeout) ends as Ctrl-C does: fixtures tear down (servers stop), atexit runs.
signal.signal(signal.SIGTERM, signal.default_int_handler)
os.environ["TMPDIR"] = tempfile.tempdir = SCRATCH  # what tempfile makes, here and in subprocesses, goes with it
os.environ["SKELETON_ARTIFACTS"] = os.path.join(SCRATCH, "artifacts")
os.environ["PREFECT_HOME"] = os.path.join(SCRATCH, "prefect")  # not the checkout's .prefect/ (the Makefile's)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{SCRATCH}/mlflow.db"

import random  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from flows.settings import configure  # noqa: E402
from helpers import classifier_on, encode, tiny_bert_config, tiny_llama_config, word_tokenizer  # noqa: E402

configure()  # environment defaults, Prefect's JSON results, the library's logger: what the command sets
# Prefect reads its settings and sets up its logging when its main module loads, so after configure() (as in the
# command); loaded here, at collection, its console log handler binds to the session's stderr, not one test's
# capture (closed when that test ends, after which every log line fails). The project's own modules import in any
# order.
import prefect.main  # noqa: E402,F401


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from skeleton.backbones import resolve_backbone

    return AutoTokenizer.from_pretrained(resolve_backbone("minilm"))


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny random BERT checkpoint folder (with the real MiniLM tokenizer): a local backbone path."""
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(tiny_bert_config()).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wide_backbone_dir(tmp_path_factory, minilm_tokenizer):
    """A small BERT whose FFN dominates the work, so pruning it gives a clear, measurable speed-up (on the tiny one
    a skeleton's speed-up is within timing noise of 1, and a busy machine can measure the full model faster)."""
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide-bert")
    BertModel(tiny_bert_config(hidden_size=64, intermediate_size=8192)).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM checkpoint folder with a word-level tokenizer: a local backbone path."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_classifier(tiny_backbone_dir):
    return classifier_on(tiny_backbone_dir)


@pytest.fixture
def batch(minilm_tokenizer):
    return encode(minilm_tokenizer)


@pytest.fixture(params=["bert", "llama"])
def tiny_family(request):
    """(classifier, tokenizer, padded batch) on a tiny random backbone of each family: the suites that hold for
    every family take this fixture and run once per family."""
    folder = request.getfixturevalue({"bert": "tiny_backbone_dir", "llama": "tiny_llama_dir"}[request.param])
    model, tokenizer = classifier_on(folder)
    return model, tokenizer, encode(tokenizer)


POSITIVE = ["great", "wonderful", "moving", "sharp", "funny", "brilliant", "tender", "bold"]
NEGATIVE = ["dull", "boring", "clumsy", "flat", "tedious", "awful", "lifeless", "stale"]


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for i in range(120):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rows.append({"review": f"review {i}: a {words[0]} and {words[1]} film", "sentiment": label})
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path



def pytest_configure(config):
    if config.option.basetemp is None:  # tmp_path folders too: pytest would keep its last three runs' in /tmp
        config.option.basetemp = os.path.join(SCRATCH, "pytest")
