import json

import pytest
import torch

from helpers import masked_and_sliced, run_fresh
from skeleton.backbones import family_of
from skeleton.folder import ArtifactError, SkeletonFolder
from skeleton.prune import slice_ffn
from skeleton.selection import check_rate, kept_width, select
from skeleton.stages import full_keep


def random_keep(model, rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    return select([torch.rand(64, generator=g) for _ in range(2)], rate)


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.65, 0.8])
def test_slicing_equals_zero_masking(tiny_family, rate):
    """Every family: cutting neurons out of the weights gives what zeroing their down-projection columns gives."""
    model, _, batch = tiny_family
    masked, sliced = masked_and_sliced(model, random_keep(model, rate))
    with torch.no_grad():
        expected = masked(batch["input_ids"], batch["attention_mask"])
        got = sliced(batch["input_ids"], batch["attention_mask"])
    width = kept_width(64, rate)
    assert sliced.backbone.config.intermediate_size == width
    for block in family_of(sliced.backbone).ffn_blocks(sliced.backbone):
        assert all(up.weight.shape == (width, 32) for up in block.up) and block.down.weight.shape == (32, width)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if rate > 0:  # and pruning did change the model, so the comparison means something
        with torch.no_grad():
            assert not torch.allclose(got, model(batch["input_ids"], batch["attention_mask"]), atol=1e-4)


def test_kept_width_rounds_to_multiples_of_eight():
    assert kept_width(1536, 0.65) == 536
    assert kept_width(1536, 0.5) == 768
    assert kept_width(1536, 0.8) == 304
    assert kept_width(1536, 0.0) == 1536
    assert kept_width(64, 0.99) == 8
    assert all(kept_width(1536, r / 100) % 8 == 0 for r in range(100))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan")])
def test_bad_pruning_rate_is_rejected(rate):
    with pytest.raises(ValueError, match=r"pruning rate must be in \[0, 1\)"):
        check_rate(rate)


def test_select_keeps_top_scores_in_order():
    scores = [torch.arange(16.0), torch.arange(16.0).flip(0)]
    keep = select(scores, 0.5)
    assert keep[0].tolist() == list(range(8, 16))
    assert keep[1].tolist() == list(range(8))


def test_export_round_trip_in_fresh_process(tiny_family, tmp_path):
    """Every family: a uniform skeleton is a stock checkpoint that reloads, unregistered, with the same logits."""
    model, tokenizer, batch = tiny_family
    keep = random_keep(model, 0.65)
    slice_ffn(model.backbone, keep)
    folder = SkeletonFolder.export(model, tokenizer, keep, tmp_path / "sk", {"rate": 0.65})
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    # Stock transformers loads the backbone; nothing of ours is needed to rebuild its architecture.
    result = run_fresh(f"""
        import json, sys, torch
        from transformers import AutoModel
        backbone = AutoModel.from_pretrained({str(folder / "backbone")!r})
        assert type(backbone).__module__.startswith("transformers."), type(backbone)
        assert "skeleton" not in sys.modules  # loaded without our registration
        from skeleton.model import PromptClassifier
        model = PromptClassifier.from_adapter(backbone, {str(folder / "adapter")!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            got = model(io["batch"]["input_ids"], io["batch"]["attention_mask"])
        print(json.dumps({{"diff": (got - io["expected"]).abs().max().item(), "params": model.num_parameters(),
                           "width": backbone.config.intermediate_size}}))
    """)
    assert result["diff"] <= 1e-5
    assert result["params"] == model.num_parameters()
    assert result["width"] == kept_width(64, 0.65)
    loaded, _, neurons = folder.load()
    assert neurons["keep"] == [k.tolist() for k in keep] and neurons["rate"] == 0.65 and "heads" not in neurons
    assert json.loads((folder / "backbone" / "config.json").read_text())["model_type"] == model.backbone.config.model_type
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["input_ids"], batch["attention_mask"]), expected, rtol=0, atol=1e-5)


def test_corrupt_artifact_is_named(tiny_classifier, tmp_path):
    model, tokenizer = tiny_classifier
    folder = SkeletonFolder.export(model, tokenizer, full_keep(model.backbone), tmp_path / "sk", {})
    folder.verify()
    weights = folder / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="model.safetensors.*corrupt.*re-run"):
        folder.load()
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a complete skeleton"):
        folder.load()


def test_failed_export_leaves_nothing(tiny_classifier, tmp_path, monkeypatch):
    model, tokenizer = tiny_classifier

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_adapter", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        SkeletonFolder.export(model, tokenizer, full_keep(model.backbone), tmp_path / "sk", {})
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("with_bias", [True, False])
def test_reconstruction_is_the_least_squares_fit_of_the_full_ffn_output(tiny_classifier, batch, with_bias):
    """Layer 0's FFN input does not depend on pruning, so with statistics taken on the same positions and no
    damping, the reconstructed skeleton's layer-0 down output is exactly the least-squares fit of the full model's
    on the kept activations (plus a constant where the down projection has a bias, LLaMA-style without one), and
    fits it better than plain removal."""
    import copy

    from datasets import Dataset

    from skeleton.attribution import activation_moments, capture_inputs, down_projections
    from skeleton.prune import reconstruct_ffn

    model, _ = tiny_classifier
    model = copy.deepcopy(model)
    if not with_bias:
        for layer in model.backbone.encoder.layer:
            layer.output.dense.bias = None
    ids = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    data = Dataset.from_dict({"input_ids": ids, "label": batch["labels"].tolist()})
    keep = random_keep(model, 0.65)

    def layer0(classifier):
        """(down input, down output) at layer 0 over the non-padding positions."""
        down, out = down_projections(classifier)[0], []
        handle = down.register_forward_hook(lambda _m, _a, o: out.append(o))
        with torch.no_grad(), capture_inputs([down]) as acts:
            embeds, mask = classifier.embed(batch["input_ids"], batch["attention_mask"])
            classifier.features(embeds, mask)
        handle.remove()
        return acts[0][mask.bool()].double(), out[0][mask.bool()].double()

    rebuilt, plain = copy.deepcopy(model), copy.deepcopy(model)
    reconstruct_ffn(rebuilt.backbone, keep, activation_moments(rebuilt, data, pad_id=0, batch_size=3), damping=0.0)
    slice_ffn(rebuilt.backbone, keep)
    slice_ffn(plain.backbone, keep)
    acts, full = layer0(model)
    kept = acts[:, keep[0]]
    if with_bias:
        kept = torch.cat([kept, torch.ones(len(kept), 1, dtype=kept.dtype)], 1)
    best = kept @ torch.linalg.lstsq(kept, full).solution
    got = layer0(rebuilt)[1]
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4)
    assert ((layer0(plain)[1] - full) ** 2).sum() > 1.5 * ((got - full) ** 2).sum()


def test_the_skeleton_record_reads_back_what_was_written(tmp_path):
    """neurons.json: the index lists, the meta, counts per layer, the method from the scores it was cut by, a name."""
    from skeleton.folder import NEURONS, model_name, neurons_record

    (tmp_path / "scores.json").write_text(json.dumps({"method": "wanda"}))
    meta = {"rate": 0.5, "task": "reviews", "head_rate": 0.5, "reconstruct": True,
            "scores": str(tmp_path / "scores.parquet")}
    (tmp_path / NEURONS).write_text(json.dumps(neurons_record([[0, 2], [1, 3, 5]], [[0], [1]], meta)))
    folder = SkeletonFolder(tmp_path)
    assert folder.record() == {"keep": [[0, 2], [1, 3, 5]], "heads": [[0], [1]], **meta}
    summary = folder.meta()
    assert summary == {**meta, "kept_widths": [2, 3], "kept_heads": [1, 1], "method": "wanda"}
    assert model_name(summary, tmp_path) == "reviews-wanda-p0.5-h0.5-rec" == folder.name()
    assert model_name({"rate": 0.5}, "/skeletons/abc123") == "abc123"  # exported before the task was recorded
    assert model_name({"method": "random", "rate": 0.8}) == "random-p0.8"  # a sweep point's MLflow run name
