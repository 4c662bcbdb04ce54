import os
import tempfile

# Before anything imports the tasks: the whole test session writes artifacts and MLflow runs to a scratch folder.
SCRATCH = tempfile.mkdtemp(prefix="skeleton-tests-")
os.environ["SKELETON_ARTIFACTS"] = os.path.join(SCRATCH, "artifacts")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{SCRATCH}/mlflow.db"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
    return BertConfig(**{**settings, **overrides})


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


@pytest.fixture
def tiny_classifier(tiny_backbone_dir):
    from skeleton.backbones import load_backbone
    from skeleton.model import AdapterConfig, PromptClassifier

    backbone, tokenizer = load_backbone(str(tiny_backbone_dir))
    model = PromptClassifier(backbone, AdapterConfig(num_labels=3, prompt_length=4), seed=0)
    with torch.no_grad():  # a trained-looking head, so logits differ across classes
        model.head.weight.normal_(0, 1.0)
    return model.eval(), tokenizer


@pytest.fixture
def batch(minilm_tokenizer):
    texts = ["a gripping, beautifully made film", "dull and far too long", "it was fine", "the worst plot ever"]
    enc = minilm_tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([0, 1, 2, 1])}


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the real packaged MiniLM model (slower)")
