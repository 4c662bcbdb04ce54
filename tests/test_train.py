import pytest
import torch
from datasets import Dataset

from skeleton.backbones import load_backbone, norm_parameters
from skeleton.evaluate import L2_STRENGTHS, linear_probe
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.train import TrainConfig, accuracy, bucketed_batches, predict, train


@pytest.fixture
def toy_data(minilm_tokenizer):
    texts = [f"{w} film number {i}" for i, w in enumerate(["good", "bad", "fine", "awful"] * 12)]
    enc = minilm_tokenizer(texts)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "label": [i % 2 for i in range(len(texts))]})


def tuned(tiny_backbone_dir, data, seed, precision="fp32"):
    backbone, tokenizer = load_backbone(str(tiny_backbone_dir))
    model = PromptClassifier(backbone, AdapterConfig(num_labels=2, prompt_length=4), seed=seed)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    record = train(model, data, data, tokenizer.pad_token_id, TrainConfig(steps=6, batch_size=8, eval_every=3, seed=seed,
                                                                          precision=precision))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in frozen.items())  # backbone stays frozen
    return model.adapter_state(), record


def test_training_is_seeded_and_deterministic(tiny_backbone_dir, toy_data):
    first, record = tuned(tiny_backbone_dir, toy_data, seed=3)
    second, _ = tuned(tiny_backbone_dir, toy_data, seed=3)
    other, _ = tuned(tiny_backbone_dir, toy_data, seed=4)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["prompt"], other["prompt"])
    assert record["steps"] == 6 and record["step"] in (3, 6) and 0 <= record["val_accuracy"] <= 1


def test_bf16_training_is_deterministic_and_keeps_float32_adapters(tiny_backbone_dir, toy_data):
    first, _ = tuned(tiny_backbone_dir, toy_data, seed=3, precision="bf16")
    second, _ = tuned(tiny_backbone_dir, toy_data, seed=3, precision="bf16")
    full_precision, _ = tuned(tiny_backbone_dir, toy_data, seed=3)
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == torch.float32 for k in first)
    assert not torch.equal(first["prompt"], full_precision["prompt"])  # the forward really ran in bf16


def test_tune_norms_trains_the_normalisation_layers_and_nothing_else(tiny_backbone_dir, toy_data):
    backbone, tokenizer = load_backbone(str(tiny_backbone_dir))
    model = PromptClassifier(backbone, AdapterConfig(num_labels=2, prompt_length=4), seed=0)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    norms = norm_parameters(model.backbone)
    # every LayerNorm of the tiny BERT: embeddings, then per layer after attention and after the FFN
    assert len(norms) == 2 * (1 + 2 * backbone.config.num_hidden_layers)
    record = train(model, toy_data, toy_data, tokenizer.pad_token_id,
                   TrainConfig(steps=6, batch_size=8, eval_every=2, tune_norms=True, lr_head=0.05))
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(norms)  # only normalisation parameters moved
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen again afterwards
    # the restored prompt, head and norms are those of the best validation check: they reproduce its accuracy
    assert accuracy(predict(model, toy_data, tokenizer.pad_token_id), toy_data["label"]) == record["val_accuracy"]


def test_bucketed_batches_cover_every_example_once():
    lengths = [(i * 7) % 31 + 1 for i in range(203)]
    batches = bucketed_batches(lengths, batch_size=16, seed=0, pool=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    assert batches == bucketed_batches(lengths, batch_size=16, seed=0, pool=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # similar lengths per batch: little padding


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="num_labels"):
        AdapterConfig(num_labels=1)


def test_attention_query_trains_and_reloads(tiny_backbone_dir, toy_data, tmp_path, batch):
    """The pooling query is part of the adapter: it trains (from zero), is saved and comes back exactly."""
    backbone, tokenizer = load_backbone(str(tiny_backbone_dir))
    model = PromptClassifier(backbone, AdapterConfig(num_labels=2, prompt_length=4), seed=0)
    assert model.config.pooling == "attention" and torch.equal(model.query, torch.zeros_like(model.query))
    train(model, toy_data, toy_data, tokenizer.pad_token_id, TrainConfig(steps=6, batch_size=8, eval_every=6))
    assert model.query.abs().sum() > 0
    model.save_adapter(tmp_path)
    again = PromptClassifier.from_adapter(backbone, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]),
                                   model(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_linear_probe_trains_the_prompt_tuning_head(tiny_backbone_dir, toy_data, precision):
    """The probe is the same head (attention pooling + linear) on frozen, un-prompted states; it learns the toy
    task (the label is the adjective) and is deterministic."""
    backbone, tokenizer = load_backbone(str(tiny_backbone_dir))
    splits = {"train": toy_data, "validation": toy_data, "test": toy_data}
    result = linear_probe(backbone, splits, tokenizer.pad_token_id, num_labels=2, precision=precision)
    assert result["accuracy"] > 0.9 and result["val_accuracy"] > 0.9 and result["l2"] in L2_STRENGTHS
    assert linear_probe(backbone, splits, tokenizer.pad_token_id, num_labels=2, precision=precision) == result


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    """bf16 emulated on a CPU without AVX512-BF16 / AMX is 30x slower: auto must not pick it there."""
    from flows.config import SweepConfig
    from skeleton.train import resolve_precision

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert resolve_precision("auto") == expected
        assert SweepConfig().resolved().precision == expected  # what the sweep's runs and stage caches record
        assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"  # asked for: kept
