"""The real packaged MiniLM: slicing equals masking, export round trip with stock transformers, attribution."""
import pytest
import torch

from helpers import masked_and_sliced, run_fresh
from skeleton.attribution import attribute
from skeleton.backbones import load_backbone
from skeleton.data import load_task, tokenize
from skeleton.folder import SkeletonFolder
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.selection import kept_width, select

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real():
    backbone, tokenizer = load_backbone("minilm")
    model = PromptClassifier(backbone, AdapterConfig(num_labels=2, prompt_length=20), seed=0).eval()
    data = tokenize(load_task("rotten_tomatoes"), tokenizer, max_length=64)
    return model, tokenizer, data["train"].select(range(32))


def test_real_skeleton_matches_masking_and_reloads(real, tmp_path):
    model, tokenizer, examples = real
    scores = attribute("grad_x_act", model, examples, tokenizer.pad_token_id, batch_size=16)
    assert [len(s) for s in scores] == [1536] * 6
    keep = select(scores, 0.65)
    masked, sliced = masked_and_sliced(model, keep)
    texts = ["an absorbing, well-acted drama", "a tedious mess from start to finish"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = masked(enc["input_ids"], enc["attention_mask"])
        got = sliced(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert sliced.backbone.config.intermediate_size == kept_width(1536, 0.65) == 536

    folder = SkeletonFolder.export(sliced, tokenizer, keep, tmp_path / "sk", {"rate": 0.65})
    reloaded = torch.tensor(run_fresh(f"""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        path = {str(folder / "backbone")!r}
        backbone, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        from skeleton.model import PromptClassifier
        model = PromptClassifier.from_adapter(backbone, {str(folder / "adapter")!r}).eval()
        enc = tokenizer({texts!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            print(json.dumps(model(enc["input_ids"], enc["attention_mask"]).tolist()))
    """))
    assert (reloaded - got).abs().max().item() <= 1e-5
    full_params = model.num_parameters()
    assert sliced.num_parameters() == full_params - 6 * (1536 - 536) * (2 * 384 + 1)
