"""Prompt methods on tiny BERT and tiny LLaMA: the prefix reaches every layer's attention, slicing with a prefix
equals masking, an exported prefix skeleton reloads in a fresh process with its logits, the arithmetic bound counts
what a prefix costs, and the training options (fine-tuning, layer-by-layer distillation, early stopping) do what
they say."""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import as_dataset, mask_ffn, mask_heads, tiny_bert_config, tiny_llama_config
from skeleton.backbones import family_of
from skeleton.folder import SkeletonFolder
from skeleton.macs import count_macs
from skeleton.model import PROMPT_METHODS, AdapterConfig, PromptClassifier
from skeleton.prune import slice_ffn, slice_heads
from skeleton.selection import select
from skeleton.train import TrainConfig, train

M = 3  # prompt length


@pytest.fixture(params=["bert", "llama"])
def family(request):
    return request.param


def backbone_of(family: str, vocab_size: int):
    from transformers import BertModel, LlamaModel

    torch.manual_seed(0)
    if family == "bert":
        return BertModel(tiny_bert_config(vocab_size=vocab_size)).eval()
    return LlamaModel(tiny_llama_config(vocab_size=vocab_size)).eval()


def classifier(family: str, vocab_size: int, method: str = "prefix", seed: int = 0) -> PromptClassifier:
    model = PromptClassifier(backbone_of(family, vocab_size), AdapterConfig(3, M, prompt_method=method), seed=seed)
    with torch.no_grad():  # a trained-looking head, so logits differ across classes
        model.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def random_keep(model, rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = family_of(model.backbone).ffn_blocks(model.backbone)
    return select([torch.rand(b.down.in_features, generator=g) for b in blocks], rate)


def logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def test_prompt_methods_are_registered():
    assert PROMPT_METHODS.names() == ["input", "prefix"]
    with pytest.raises(ValueError, match="unknown prompt method 'deep'; known: input, prefix"):
        AdapterConfig(2, 4, prompt_method="deep")


def test_prefix_reaches_every_layer(family, batch, minilm_tokenizer):
    model = classifier(family, len(minilm_tokenizer))
    base = logits(model, batch)
    layers = model.prompt.layers
    assert len(layers) == model.backbone.config.num_hidden_layers
    for i, kv in enumerate(layers):
        for part in (0, 1):  # its keys, then its values
            with torch.no_grad():
                kv[part] += 0.5
            assert (logits(model, batch) - base).abs().max() > 1e-4, f"layer {i} {'kv'[part]} ignored"
            with torch.no_grad():
                kv[part] -= 0.5
    torch.testing.assert_close(logits(model, batch), base)


def test_prefix_adds_no_positions_and_text_keeps_its_positions(family, batch, minilm_tokenizer):
    model = classifier(family, len(minilm_tokenizer))
    embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
    assert model.prompt_positions == 0 and embeds.shape[1] == batch["input_ids"].shape[1]
    assert model.hidden(embeds, mask).shape[1] == batch["input_ids"].shape[1]
    # A prefix whose keys every text token ignores (masked) leaves the backbone's plain output on the text.
    kwargs = model.prompt.backbone_kwargs(model.backbone, mask)
    kwargs["attention_mask"][:, :M] = 0
    hidden = model.backbone(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state
    plain = model.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden[real], plain[real], rtol=1e-4, atol=1e-5)


def test_prefix_cache_gives_what_a_dynamic_cache_filled_per_forward_gave(family, batch, minilm_tokenizer):
    """The prefix's PrefixCache (kept per batch size in inference: no per-forward rebuild, no copy of the prefix)
    against what it replaced, a DynamicCache filled with the expanded prefix on every forward: bitwise the same
    logits and gradients."""
    from transformers import DynamicCache

    model = classifier(family, len(minilm_tokenizer))
    prompt = model.prompt

    def per_forward(backbone, attention_mask):
        b, text = attention_mask.shape
        cache = DynamicCache()
        for i, kv in enumerate(prompt.layers):
            cache.update(kv[0].expand(b, -1, -1, -1), kv[1].expand(b, -1, -1, -1), i)
        positions = torch.arange(text).expand(b, -1)
        return {"attention_mask": torch.cat([attention_mask.new_ones(b, M), attention_mask], 1),
                "position_ids": positions, prompt.cache_kwarg: cache}

    def run(kwargs_of):
        prompt.backbone_kwargs = kwargs_of
        try:
            out = logits(model, batch)
            model.zero_grad()
            model(batch["input_ids"], batch["attention_mask"]).sum().backward()
            return out, [kv.grad.clone() for kv in prompt.layers]
        finally:
            del prompt.backbone_kwargs

    (old, old_grads), (new, new_grads) = run(per_forward), run(type(prompt).backbone_kwargs.__get__(prompt))
    assert torch.equal(old, new) and all(torch.equal(a, b) for a, b in zip(old_grads, new_grads))
    with torch.no_grad():  # inference: one cache per batch size, kept
        assert prompt.cache(4) is prompt.cache(4) and prompt.cache(2) is not prompt.cache(4)
    assert prompt.cache(4) is not prompt.cache(4)  # autograd on: made per forward
    with torch.no_grad():
        kept = prompt.cache(4)
        prompt.load_state({k: v + 1.0 for k, v in prompt.state().items()})  # new parameters: a new cache
        assert prompt.cache(4) is not kept
        torch.testing.assert_close(prompt.cache(4).layers[0].keys[0], prompt.layers[0][0])
    assert not torch.equal(logits(model, batch), new)
    assert copy.deepcopy(model).prompt._memo == {}  # a copy makes its own


def test_padding_does_not_change_a_prefix_models_answer(family, batch, minilm_tokenizer):
    model = classifier(family, len(minilm_tokenizer))
    padded = logits(model, batch)
    for i, row in enumerate(batch["attention_mask"]):
        n = int(row.sum())
        alone = logits(model, {"input_ids": batch["input_ids"][i: i + 1, :n], "attention_mask": row[None, :n]})
        torch.testing.assert_close(alone[0], padded[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["input", "prefix"])
def test_slicing_with_a_prompt_equals_masking(family, method, batch, minilm_tokenizer):
    sliced, masked = classifier(family, len(minilm_tokenizer), method), classifier(family, len(minilm_tokenizer), method)
    keep = random_keep(sliced, 0.5)
    slice_ffn(sliced.backbone, keep)
    mask_ffn(masked.backbone, keep)
    torch.testing.assert_close(logits(sliced, batch), logits(masked, batch), rtol=1e-4, atol=1e-5)


def test_cutting_heads_cuts_their_prefix(batch, minilm_tokenizer):
    sliced, masked = classifier("bert", len(minilm_tokenizer)), classifier("bert", len(minilm_tokenizer))
    heads = [torch.tensor([1]), torch.tensor([0])]
    slice_heads(sliced.backbone, heads)
    sliced.prompt.keep_heads(heads)
    mask_heads(masked.backbone, heads)
    assert [tuple(kv.shape) for kv in sliced.prompt.layers] == [(2, 1, M, 16)] * 2
    torch.testing.assert_close(logits(sliced, batch), logits(masked, batch), rtol=1e-4, atol=1e-5)


def test_prefix_skeleton_reloads_in_a_fresh_process(family, batch, minilm_tokenizer, tmp_path):
    model = classifier(family, len(minilm_tokenizer))
    keep = random_keep(model, 0.65)
    slice_ffn(model.backbone, keep)
    folder = SkeletonFolder.export(model, minilm_tokenizer, keep, tmp_path / "sk", {"rate": 0.65})
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    expected = logits(model, batch)
    script = textwrap.dedent(f"""
        import json, torch
        from skeleton.folder import SkeletonFolder
        model, _, _ = SkeletonFolder({str(folder)!r}).load()
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            out = model(batch["input_ids"], batch["attention_mask"])
        print(json.dumps({{"logits": out.tolist(), "method": model.config.prompt_method}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["method"] == "prefix"
    assert (torch.tensor(result["logits"]) - expected).abs().max().item() <= 1e-5
    assert SkeletonFolder(folder).load()[0].prompt.layers[0].shape == model.prompt.layers[0].shape


def test_macs_count_a_prefix_as_keys_only(family, minilm_tokenizer):
    prefix = classifier(family, len(minilm_tokenizer), "prefix")
    soft = classifier(family, len(minilm_tokenizer), "input")
    none = PromptClassifier(backbone_of(family, len(minilm_tokenizer)), AdapterConfig(3, 0))
    b, t = 2, 10
    assert count_macs(prefix, b, t).projections == count_macs(none, b, t).projections
    assert count_macs(soft, b, t).projections == count_macs(none, b, t + M).projections
    width = sum(l.out_features for n, l in prefix.backbone.named_modules() if n.endswith(("query", "q_proj")))
    assert count_macs(prefix, b, t).attention == 2 * b * t * (t + M) * width
    assert count_macs(soft, b, t).attention == 2 * b * (t + M) * (t + M) * width


def toy_data(tokenizer, n=48, seed=0):
    """Two classes told apart by one word: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        texts.append(f"review {i} : a {'great' if label else 'dull'} film")
        labels.append(label)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return as_dataset({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                       "labels": torch.tensor(labels)})


def test_prefix_training_moves_only_the_prompt_and_head(family, minilm_tokenizer):
    model = classifier(family, len(minilm_tokenizer))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    prefix = [kv.detach().clone() for kv in model.prompt.layers]
    data = toy_data(minilm_tokenizer)
    record = train(model, data, data, minilm_tokenizer.pad_token_id, TrainConfig(steps=12, eval_every=4, lr_prompt=1e-2))
    assert record["steps"] == 12
    assert all(not torch.equal(a, b.detach()) for a, b in zip(prefix, model.prompt.layers))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())


def test_finetuning_trains_the_backbone(minilm_tokenizer):
    model = classifier("bert", len(minilm_tokenizer), "input")
    model = PromptClassifier(model.backbone, AdapterConfig(2, 0))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    data = toy_data(minilm_tokenizer)
    train(model, data, data, minilm_tokenizer.pad_token_id, TrainConfig(steps=8, eval_every=4, finetune=True,
                                                                         lr_backbone=1e-3))
    changed = [k for k, v in before.items() if not torch.equal(v, model.backbone.state_dict()[k])]
    assert any("intermediate.dense.weight" in k for k in changed) and any("query.weight" in k for k in changed)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen again after training


def test_early_stopping_ends_after_patience_checks_without_gain(minilm_tokenizer):
    model = classifier("bert", len(minilm_tokenizer), "input")
    data = toy_data(minilm_tokenizer)
    # lr 0: validation accuracy never improves on the first check, so training stops after 1 + patience checks
    config = TrainConfig(steps=40, eval_every=2, patience=3, lr_prompt=0.0, lr_head=0.0)
    record = train(model, data, data, minilm_tokenizer.pad_token_id, config)
    assert record["steps"] == 8 and record["step"] == 2


def test_hidden_distillation_pulls_a_skeleton_towards_its_teacher(family, minilm_tokenizer):
    from skeleton.train import hidden_distillation

    teacher = classifier(family, len(minilm_tokenizer))
    data = toy_data(minilm_tokenizer)
    pad = minilm_tokenizer.pad_token_id

    enc = minilm_tokenizer([f"a {w} film" for w in ("great", "dull", "fine")], padding=True, return_tensors="pt")

    def gap(model):
        with torch.no_grad():
            _, s, mask = model.layer_states(enc["input_ids"], enc["attention_mask"])
            _, t, _ = teacher.layer_states(enc["input_ids"], enc["attention_mask"])
        return hidden_distillation(s, t, mask).item()

    gaps = {}
    for weight in (0.0, 10.0):
        student = classifier(family, len(minilm_tokenizer))
        slice_ffn(student.backbone, random_keep(student, 0.75))
        train(student, data, data, pad, TrainConfig(steps=30, eval_every=30, lr_prompt=1e-2, distill_hidden=weight),
              teacher=teacher)
        gaps[weight] = gap(student)
    assert gaps[10.0] < gaps[0.0]
    with pytest.raises(ValueError, match="needs a teacher"):
        train(teacher, data, data, pad, TrainConfig(steps=1, distill_hidden=1.0))


def test_an_input_prompt_adapter_is_a_peft_adapter(family, batch, minilm_tokenizer, tmp_path):
    """adapter/ of an input prompt is a real PEFT prompt-tuning adapter: PEFT runs it on the stock backbone, and our
    head on PEFT's hidden states gives the exported model's logits."""
    import peft  # a test dependency (the [test] extra)
    from transformers import AutoModel

    model = classifier(family, len(minilm_tokenizer), "input")
    keep = random_keep(model, 0.5)
    slice_ffn(model.backbone, keep)
    folder = SkeletonFolder.export(model, minilm_tokenizer, keep, tmp_path / "sk", {"rate": 0.5})
    stock = AutoModel.from_pretrained(folder / "backbone")
    tuned = peft.PeftModel.from_pretrained(stock, folder / "adapter").eval()
    with torch.no_grad():
        hidden = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = torch.cat([batch["attention_mask"].new_ones(len(hidden), M), batch["attention_mask"]], 1)
        theirs = model.head(model.pool(hidden, mask))
    assert (theirs - logits(model, batch)).abs().max().item() <= 1e-5
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head_config.json"]


def test_a_prefix_adapter_uses_names_of_its_own(minilm_tokenizer, tmp_path):
    model = classifier("bert", len(minilm_tokenizer), "prefix")
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors", "head_config.json", "prefix.safetensors"]
