"""Device and dtype readiness of the library: a BERT with attention pooling runs in bfloat16 (the whole classifier
cast, a classifier built on a bf16 backbone, and `skeleton benchmark --dtype bfloat16`), devices resolve and are
checked, and every library step (training, prediction, attribution, activation moments, the linear probe) takes a
model on an explicit device: "cpu" here; "cuda" where a GPU is, against the CPU's numbers.
"""
import copy
import json

import pytest
import torch

from helpers import as_dataset, encode
from skeleton.attribution import activation_moments, attribute
from skeleton.backbones import load_backbone
from skeleton.evaluate import linear_probe
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.train import TrainConfig, predict, resolve_device, train


def logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"].to(model.head.weight.device),
                     batch["attention_mask"].to(model.head.weight.device))


@pytest.mark.parametrize("method", ["input", "prefix"])
def test_a_bfloat16_bert_with_attention_pooling_runs_in_one_dtype(tiny_backbone_dir, batch, method):
    """The bug: attention pooling scored in float32 and handed float32 features to a bf16 head ("mat1 and mat2 must
    have the same dtype")."""
    backbone, _ = load_backbone(str(tiny_backbone_dir))
    model = PromptClassifier(backbone, AdapterConfig(3, 4, prompt_method=method)).eval()
    assert model.config.pooling == "attention"
    with torch.no_grad():
        model.query.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))  # weights that are not uniform
        model.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    expected = logits(model, batch)
    with torch.autocast("cpu", torch.bfloat16):  # autocast: the same logits as before the fix
        autocast = logits(model, batch)
    half = copy.deepcopy(model).to(torch.bfloat16)
    got = logits(half, batch)
    assert got.dtype == torch.bfloat16 and autocast.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() < 0.05 * scale
    assert (autocast.float() - expected).abs().max().item() < 0.05 * scale
    embeds, mask = half.embed(batch["input_ids"], batch["attention_mask"])
    assert half.features(embeds, mask).dtype == torch.bfloat16  # pooling leaves in the hidden states' dtype
    # Built on a bf16 backbone: head and query in its dtype
    fresh = PromptClassifier(half.backbone, AdapterConfig(3, 4, prompt_method=method)).eval()
    assert fresh.head.weight.dtype == fresh.query.dtype == torch.bfloat16
    assert logits(fresh, batch).dtype == torch.bfloat16


def test_skeleton_benchmark_in_bfloat16_with_attention_pooling(tiny_backbone_dir, tmp_path):
    from flows.commands import benchmark

    assert benchmark.main(["--demo", "--random-init", "--backbone", str(tiny_backbone_dir), "--dtype", "bfloat16",
                           "--prompt-methods", "input", "prefix", "--rates", "0.5", "--prompt-length", "4",
                           "--batch-sizes", "2", "--lengths", "8", "--repeats", "2", "--warmup", "1", "--budget", "0",
                           "--no-memory", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["environment"]["dtype"] == "bfloat16"
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"full", "full (prefix)", "random p=0.5", "prefix random p=0.5"}
    assert all(r["latency_ms"] > 0 for r in rows.values())
    assert set(rows["prefix random p=0.5"]["speedups"]) == {"full (prefix)"}


def test_devices_resolve_and_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda:1")


def steps_on(device: str | None, folder, data):
    """Every library step on a model placed on `device` (None: load_backbone's default): its numbers."""
    placed = {} if device is None else {"device": device}
    backbone, tokenizer = load_backbone(str(folder), **placed)
    model = PromptClassifier(backbone, AdapterConfig(2, 4, prompt_method="prefix")).eval()
    pad = tokenizer.pad_token_id
    record = train(model, data, data, pad, TrainConfig(steps=4, eval_every=2, batch_size=4))
    out = {"val_accuracy": record["val_accuracy"], "logits": predict(model, data, pad),
           "prefix": model.prompt.layers[0].detach().cpu()}
    for method in ("grad_x_act", "activation", "wanda", "skill"):
        out[method] = attribute(method, model, data, pad, batch_size=4)
    out["moments"] = activation_moments(model, data, pad, batch_size=4)
    splits = {"train": data, "validation": data, "test": data}
    out["probe"] = linear_probe(load_backbone(str(folder), **placed)[0], splits, pad, 2)
    return out


@pytest.fixture(scope="module")
def toy(minilm_tokenizer):
    texts = [f"review {i} : a {'great' if i % 2 else 'dull'} film" for i in range(12)]
    enc = encode(minilm_tokenizer, texts, labels=[i % 2 for i in range(12)])
    return as_dataset(enc)


def test_every_step_takes_a_model_on_an_explicit_cpu_device(tiny_backbone_dir, toy):
    """Batches follow the model; what the steps return is on the CPU (on the CPU, moving is the identity, so the
    numbers are those of before: the rest of the suite checks them)."""
    out = steps_on("cpu", tiny_backbone_dir, toy)
    assert 0.0 <= out["val_accuracy"] <= 1.0 and out["logits"].shape == (len(toy), 2)
    for key in ("grad_x_act", "activation", "wanda", "skill"):
        assert all(s.device.type == "cpu" and s.dtype == torch.float32 and s.isfinite().all() for s in out[key])
    assert all(mean.device.type == cov.device.type == "cpu" for mean, cov in out["moments"])
    assert 0.0 <= out["probe"]["accuracy"] <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_step_runs_on_a_gpu_like_on_the_cpu(tiny_backbone_dir, toy):
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu, cpu = steps_on("cuda", tiny_backbone_dir, toy), steps_on("cpu", tiny_backbone_dir, toy)
    torch.testing.assert_close(gpu["logits"], cpu["logits"], rtol=1e-3, atol=1e-4)
    for key in ("grad_x_act", "activation", "wanda"):
        for a, b in zip(gpu[key], cpu[key]):
            assert a.device.type == "cpu"
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert abs(gpu["probe"]["accuracy"] - cpu["probe"]["accuracy"]) <= 0.1
