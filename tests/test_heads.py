"""Attention-head pruning, per-layer FFN widths and the skeleton_bert checkpoints that hold them (tiny BERT)."""
import copy
import json

import pandas as pd
import pytest
import torch

from helpers import as_dataset, captum_grad_x_act, classifier_on, mask_ffn, mask_heads, run_fresh, tiny_bert_config
from skeleton.attribution import METHODS, attribute, attribute_with_heads, out_projections, scores_heads
from skeleton.backbones import Family
from skeleton.folder import SkeletonFolder
from skeleton.prune import slice_ffn, slice_heads
from skeleton.selection import ALLOCATIONS, allocate, select, select_heads

HEADS, HEAD_DIM = 4, 8  # tiny BERT with 4 heads of 8 (hidden 32)


@pytest.fixture(scope="session")
def four_head_dir(tmp_path_factory, minilm_tokenizer):
    from transformers import BertModel

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-bert-4-heads")
    BertModel(tiny_bert_config(num_attention_heads=HEADS)).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def classifier(four_head_dir):
    return classifier_on(four_head_dir)


def run(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def ffn_scores(seed=0, decay=True):
    """Random FFN scores for the 2 tiny layers, the first layer several times heavier (as measured on MiniLM)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(64, generator=g) * (4.0 if decay and i == 0 else 1.0) for i in range(2)]


@pytest.mark.parametrize("heads", [[[0, 2, 3], [1]], [[3], [0, 1, 2, 3]], [[1, 2], [0, 3]]])
def test_head_slicing_equals_head_masking(classifier, batch, heads):
    model, _ = classifier
    heads = [torch.tensor(h) for h in heads]
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    mask_heads(masked.backbone, heads)
    slice_heads(sliced.backbone, heads)
    for layer, kept in zip(sliced.backbone.encoder.layer, heads):
        inner = layer.attention.self
        assert inner.num_attention_heads == len(kept) and inner.all_head_size == len(kept) * HEAD_DIM
        assert inner.query.weight.shape == inner.key.weight.shape == inner.value.weight.shape == (len(kept) * 8, 32)
        assert layer.attention.output.dense.weight.shape == (32, len(kept) * HEAD_DIM)
    torch.testing.assert_close(run(sliced, batch), run(masked, batch), rtol=1e-6, atol=1e-6)  # float32 rounding
    assert not torch.allclose(run(sliced, batch), run(model, batch), atol=1e-4)  # pruning did change the model
    config = sliced.backbone.config
    assert config.model_type == "skeleton_bert" and config.head_dim == HEAD_DIM
    assert [config.per_layer_config[i].num_attention_heads for i in range(2)] == [len(h) for h in heads]


def test_every_layer_keeps_a_head(classifier):
    model, _ = classifier
    with pytest.raises(ValueError, match="at least one head per layer"):
        slice_heads(model.backbone, [torch.tensor([0]), torch.tensor([], dtype=torch.long)])
    assert [len(h) for h in select_heads([torch.rand(4), torch.rand(4)], 0.99)] == [1, 1]
    assert [len(h) for h in select_heads([torch.rand(4), torch.rand(4)], 0.99, "global")] == [1, 1]


@pytest.mark.parametrize("allocation", ["uniform", "global", "per_layer"])
@pytest.mark.parametrize("head_rate", [0.0, 0.5])
def test_per_layer_widths_and_heads_slicing_equals_masking(classifier, batch, allocation, head_rate):
    model, _ = classifier
    keep = select(ffn_scores(), 0.6, allocation)
    heads = select_heads([torch.rand(HEADS, generator=torch.Generator().manual_seed(i)) for i in range(2)],
                         head_rate, allocation)
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    mask_ffn(masked.backbone, keep)
    mask_heads(masked.backbone, heads)
    slice_ffn(sliced.backbone, keep)
    slice_heads(sliced.backbone, heads)
    assert [layer.intermediate.dense.out_features for layer in sliced.backbone.encoder.layer] == [len(k) for k in keep]
    torch.testing.assert_close(run(sliced, batch), run(masked, batch), rtol=0, atol=1e-6)
    uniform = len({len(k) for k in keep}) == 1 and head_rate == 0.0
    assert sliced.backbone.config.model_type == ("bert" if uniform else "skeleton_bert")


def mass_decaying_scores(layers=6, width=1536, seed=0):
    """Per-layer scores whose mass falls ~5x from first to last layer and whose shape varies (as on MiniLM)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [torch.rand(width, generator=g).pow(1 + i % 3) for i in range(layers)]
    return [s / s.mean() * (5.0 - 0.8 * i) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("allocation", ["uniform", "global", "per_layer"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.65, 0.8, 0.95, 0.99])
def test_allocation_widths_are_multiples_of_eight_near_target(allocation, rate):
    scores = mass_decaying_scores()
    widths = allocate(scores, rate, allocation)
    assert all(w % 8 == 0 and 8 <= w <= 1536 for w in widths), widths
    target = (1 - rate) * 6 * 1536
    assert abs(sum(widths) - target) <= (6 * 4 if allocation == "uniform" else 4), (widths, target)
    keep = select(scores, rate, allocation)
    assert [len(k) for k in keep] == widths
    for s, k in zip(scores, keep):  # the top-scoring neurons of each layer, in index order
        dropped = torch.ones(1536, dtype=torch.bool).index_fill(0, k, False)
        assert (k.diff() > 0).all() and (not dropped.any() or s[k].min() >= s[dropped].max())


def test_per_layer_budget_follows_attribution_mass():
    scores = mass_decaying_scores()
    widths = allocate(scores, 0.65, "per_layer")
    mass = [float(s.sum()) for s in scores]
    assert widths == sorted(widths, reverse=True) and mass == sorted(mass, reverse=True)
    share = [w / sum(widths) for w in widths]
    assert all(abs(s - m / sum(mass)) < 0.01 for s, m in zip(share, mass))
    # A layer holding nearly all the mass is capped at its width; the rest of the budget goes to the others.
    heavy = [scores[0] * 1000, *scores[1:]]
    widths = allocate(heavy, 0.5, "per_layer")
    assert widths[0] == 1536 and sum(widths) == 3 * 1536


def test_global_ranking_ignores_each_layers_scale():
    """Scores are scaled per layer before the global ranking: a layer's raw magnitude does not buy it width."""
    scores = mass_decaying_scores()
    widths = allocate(scores, 0.65, "global")
    assert allocate([s * (1 + 9 * i) for i, s in enumerate(scores)], 0.65, "global") == widths
    # Same distribution in every layer (only scaled): global keeps about the same width everywhere.
    same = [torch.rand(1536, generator=torch.Generator().manual_seed(0)) * (6 - i) for i in range(6)]
    assert max(allocate(same, 0.65, "global")) - min(allocate(same, 0.65, "global")) <= 8


def test_unknown_allocation_rule_lists_known():
    with pytest.raises(KeyError, match="unknown allocation rule 'globl'; known: global, per_layer, uniform"):
        select(ffn_scores(), 0.5, "globl")
    assert set(ALLOCATIONS) == {"uniform", "global", "per_layer"}


def test_build_skeleton_validates_before_loading(tmp_path):
    from skeleton.specs import BuildSpec
    from skeleton.stages import build_skeleton
    from skeleton.train import TrainConfig

    out = tmp_path / "out"
    args = dict(data=str(tmp_path / "missing"), model=str(tmp_path / "missing"),
                scores=str(tmp_path / "missing.parquet"), rate=0.5, train=TrainConfig())
    with pytest.raises(KeyError, match="unknown allocation rule 'by_mass'"):
        build_skeleton(out, BuildSpec(**args, allocation="by_mass"))
    with pytest.raises(ValueError, match=r"head pruning rate must be in \[0, 1\)"):
        build_skeleton(out, BuildSpec(**args, head_rate=1.0))
    scores = tmp_path / "scores.parquet"  # written before head scores existed: no unit column
    pd.DataFrame({"layer": [0, 0, 1, 1], "neuron": [0, 1, 0, 1], "score": [1.0, 2.0, 3.0, 4.0]}).to_parquet(scores)
    with pytest.raises(ValueError, match="needs attention-head scores.*has none"):
        build_skeleton(out, BuildSpec(**{**args, "scores": str(scores)}, head_rate=0.5))
    from skeleton.stages import read_scores

    assert [s.tolist() for s in read_scores(scores)] == [[1.0, 2.0], [3.0, 4.0]]
    assert read_scores(scores, unit="head") == []


def test_head_attribution_equals_captum(classifier, batch, minilm_tokenizer):
    model, _ = classifier
    data = as_dataset(batch)
    ffn, heads = attribute_with_heads("grad_x_act", model, data, minilm_tokenizer.pad_token_id, batch_size=4)
    # The FFN scores are those of the FFN-only method: heads ride along in the same backward pass.
    for a, b in zip(ffn, attribute("grad_x_act", model, data, minilm_tokenizer.pad_token_id, batch_size=2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    for ours, columns in zip(heads, captum_grad_x_act(model, batch, out_projections(model)), strict=True):
        assert ours.shape == (HEADS,)
        torch.testing.assert_close(ours, columns.view(HEADS, HEAD_DIM).sum(-1), rtol=1e-4, atol=1e-7)
    assert all(h.max() > 0 for h in heads)


@pytest.mark.parametrize("method", ["activation", "random"])
def test_head_baselines_score_every_head(classifier, batch, minilm_tokenizer, method):
    model, _ = classifier
    ffn, heads = attribute_with_heads(method, model, as_dataset(batch), minilm_tokenizer.pad_token_id, batch_size=4)
    assert [s.shape for s in ffn] == [(64,), (64,)] and [h.shape for h in heads] == [(HEADS,), (HEADS,)]
    assert all(torch.isfinite(h).all() and (h > 0).all() for h in heads)
    if method == "random":  # the FFN draws come first: the same as the FFN-only random baseline
        for a, b in zip(ffn, attribute("random", model, None, 0)):
            assert torch.equal(a, b)


def test_methods_without_head_scores_say_so(classifier, batch, minilm_tokenizer):
    model, _ = classifier
    assert scores_heads("grad_x_act") and not scores_heads("integrated_gradients")
    with pytest.raises(ValueError, match="'integrated_gradients' does not score attention heads; methods that do:"):
        attribute_with_heads("integrated_gradients", model, as_dataset(batch), minilm_tokenizer.pad_token_id)
    assert "grad_x_act" in METHODS


def test_families_without_heads_raise_clearly(classifier):
    class NoHeadsFamily(Family):
        model_types = ("nothing",)

    family = NoHeadsFamily()
    with pytest.raises(NotImplementedError, match="head pruning not supported for NoHeadsFamily yet"):
        family.attention_blocks(classifier[0].backbone)
    assert not family.per_layer_shapes


def test_heterogeneous_export_round_trip_in_fresh_process(classifier, batch, tmp_path):
    model, tokenizer = classifier
    keep = select(ffn_scores(), 0.6, "per_layer")
    heads = [torch.tensor([0, 3]), torch.tensor([1, 2, 3])]
    slice_ffn(model.backbone, keep)
    slice_heads(model.backbone, heads)
    assert len({len(k) for k in keep}) == 2
    folder = SkeletonFolder.export(model, tokenizer, keep, tmp_path / "sk", {"rate": 0.6}, heads=heads)
    config = json.loads((folder / "backbone" / "config.json").read_text())
    assert config["model_type"] == "skeleton_bert" and config["architectures"] == ["SkeletonBertModel"]
    assert config["intermediate_size"] == 64 and config["num_attention_heads"] == HEADS  # the original's
    overrides = {str(i): {key: n for key, n, full in [("intermediate_size", len(k), 64),
                                                      ("num_attention_heads", len(h), HEADS)] if n != full}
                 for i, (k, h) in enumerate(zip(keep, heads))}  # only what differs from the global values
    assert config["per_layer_config"] == overrides and overrides["1"]["num_attention_heads"] == 3
    expected = run(model, batch)
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    result = run_fresh(f"""
        import json, torch
        from skeleton.skeleton_bert import register
        from transformers import AutoModel, AutoModelForSequenceClassification
        register()
        backbone = AutoModel.from_pretrained({str(folder / "backbone")!r})
        from skeleton.model import PromptClassifier
        model = PromptClassifier.from_adapter(backbone, {str(folder / "adapter")!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            got = model(io["batch"]["input_ids"], io["batch"]["attention_mask"])
        _, info = AutoModelForSequenceClassification.from_pretrained({str(folder / "backbone")!r},
                                                                      output_loading_info=True)
        print(json.dumps({{"diff": (got - io["expected"]).abs().max().item(), "params": model.num_parameters(),
                           "class": type(backbone).__name__,
                           "missing": sorted(k for k in info["missing_keys"] if not k.startswith("classifier")),
                           "mismatched": sorted(map(str, info["mismatched_keys"]))}}))
    """)
    assert result["diff"] <= 1e-5
    assert result["params"] == model.num_parameters()
    assert result["class"] == "SkeletonBertModel"
    assert result["missing"] == [] and result["mismatched"] == []
    loaded, _, neurons = SkeletonFolder(folder).load()
    assert neurons["keep"] == [k.tolist() for k in keep] and neurons["heads"] == [h.tolist() for h in heads]
    torch.testing.assert_close(run(loaded, batch), expected, rtol=0, atol=1e-5)
    # A loaded skeleton can be pruned further (its family is BERT's) and still slices == masks.
    more = [torch.tensor([1]), torch.tensor([0, 2])]
    masked = copy.deepcopy(loaded)
    mask_heads(masked.backbone, more)
    slice_heads(loaded.backbone, more)
    torch.testing.assert_close(run(loaded, batch), run(masked, batch), rtol=0, atol=1e-6)


def test_register_adds_the_model_classes_to_the_auto_classes():
    """A fresh process: importing the library leaves transformers' Auto classes alone; after register() they know
    "skeleton_bert"."""
    result = run_fresh("""
        import json, skeleton, skeleton.folder
        from transformers import AutoConfig, AutoModel
        from skeleton.skeleton_bert import SkeletonBertConfig, register
        imported = SkeletonBertConfig in AutoModel._model_mapping
        register()
        print(json.dumps([type(AutoConfig.for_model("skeleton_bert")).__name__,
                          AutoModel._model_mapping[SkeletonBertConfig].__name__, imported]))
    """)
    assert result[:2] == ["SkeletonBertConfig", "SkeletonBertModel"]
    assert result[2] is False  # importing registered nothing


def test_stages_score_and_prune_heads(tiny_backbone_dir, reviews_csv, tmp_path):
    """attribute writes head rows beside the FFN rows; build_skeleton prunes heads and per-layer widths."""
    from skeleton import stages
    from skeleton.specs import AttributeSpec, BuildSpec, DataSpec, TuneSpec
    from skeleton.train import TrainConfig

    data = stages.prepare_data(tmp_path / "data", DataSpec("reviews", str(tiny_backbone_dir), max_length=24,
                                                           data_file=str(reviews_csv), text_column="review",
                                                           label_column="sentiment"))
    train = TrainConfig(steps=2, batch_size=8, eval_every=2, warmup_steps=1)
    full = stages.tune_prompt(tmp_path / "full", TuneSpec(data["path"], str(tiny_backbone_dir), 4, train))
    scores = stages.attribute(tmp_path / "scores", AttributeSpec(data["path"], full["path"], "grad_x_act", examples=16))
    table = pd.read_parquet(scores["path"])
    assert scores["heads"] and table.groupby("unit").size().to_dict() == {"ffn": 2 * 64, "head": 2 * 2}

    def build(out: str, rate: float, **options) -> dict:
        return stages.build_skeleton(tmp_path / out, BuildSpec(data["path"], full["path"], scores["path"], rate, train,
                                                               **options))

    built = build("sk", 0.5, head_rate=0.5, allocation="per_layer")
    assert built["kept_heads"] == [1, 1] and built["allocation"] == "per_layer" and sum(built["kept_widths"]) == 64
    loaded, _, neurons = SkeletonFolder(built["path"]).load()
    assert [len(h) for h in neurons["heads"]] == [1, 1] and neurons["kept_widths"] == built["kept_widths"]
    assert loaded.backbone.config.model_type == "skeleton_bert"
    # Defaults are today's: uniform widths, all heads, a stock BERT checkpoint.
    plain = build("plain", 0.5)
    assert plain["kept_width"] == 32 and "kept_heads" not in plain
    assert json.loads((tmp_path / "plain" / "backbone" / "config.json").read_text())["model_type"] == "bert"
    assert "heads" not in json.loads((tmp_path / "plain" / "neurons.json").read_text())
    # A joint budget decides the rates itself and records what it achieved.
    joint = build("joint", 0.0, target_speedup=1.5)
    assert joint["target_speedup"] == 1.5 and joint["rate"] > 0
    tried = joint["joint_candidates"]  # the mixes it judged on validation, and their losses
    assert len(tried) > 1 and all(t["score"] > 0 for t in tried)
    best = min(tried, key=lambda t: t["score"])
    assert (joint["rate"], joint["head_rate"]) == (best["rate"], best["head_rate"])
    meta = json.loads((tmp_path / "joint" / "neurons.json").read_text())
    assert meta["rate"] == joint["rate"] and meta["joint_candidates"] == tried


def _heads(seed=0):
    return [torch.rand(HEADS, generator=torch.Generator().manual_seed(seed + i)) * 8 for i in range(2)]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_every_joint_candidate_meets_its_target_in_multiply_adds(classifier, target, allocation):
    from skeleton.budget import candidates, cut
    from skeleton.macs import count_macs

    model, _ = classifier
    ffn, heads = ffn_scores(), _heads()
    options = candidates(model, ffn, heads, target, text_len=24, allocation=allocation)
    assert len({tuple(c.heads) for c in options}) == len(options) >= 1  # distinct head counts
    assert [sum(c.heads) for c in options] == sorted((sum(c.heads) for c in options), reverse=True)
    assert (options[0].heads == [HEADS, HEADS]) == (target == 1.5)  # FFN alone reaches only the mildest target
    full = count_macs(model, 32, 24).total
    for c in options:
        small = count_macs(cut(model, ffn, heads, c), 32, 24).total
        assert full / target * 0.7 < small <= full / target  # met; rounding to widths of 8 cuts a little more
        assert c.macs * 32 == small  # the budget's arithmetic is the benchmark's
        assert all(k % 8 == 0 and k >= 8 for k in c.ffn) and all(1 <= h <= HEADS for h in c.heads)
    # The more heads a candidate cuts, the fewer FFN neurons it has to.
    assert [sum(c.ffn) for c in options] == sorted(sum(c.ffn) for c in options)


def test_joint_budget_takes_the_candidate_its_judge_scores_lowest(classifier):
    from skeleton.budget import candidates, plan

    model, _ = classifier
    ffn, heads = ffn_scores(), _heads()
    options = candidates(model, ffn, heads, 1.5, 24)
    cut_heads = lambda c: sum(HEADS - h for h in c.heads)  # noqa: E731
    choice, tried = plan(model, ffn, heads, 1.5, 24, judge=cut_heads)  # heads are dear: FFN only
    assert choice == options[0] and choice.heads == [HEADS, HEADS] and tried[0]["head_rate"] == 0
    choice, tried = plan(model, ffn, heads, 1.5, 24, judge=lambda c: -cut_heads(c))  # heads are cheap
    assert choice == options[-1] and choice.head_rate(heads) == max(t["head_rate"] for t in tried) > 0
    assert [t["score"] for t in tried] == [-cut_heads(c) for c in options]
    assert [t["rate"] for t in tried] == [c.rate(ffn) for c in options]


def test_validation_loss_judge_scores_the_cut_copy(classifier, batch):
    """The sweep's judge: cross-entropy on validation of the model cut as the candidate says, before re-tuning."""
    from skeleton.budget import Candidate, cut, loss_after_cutting
    from skeleton.train import predict

    model, tokenizer = classifier
    data, pad = as_dataset(batch), tokenizer.pad_token_id
    ffn, heads = ffn_scores(), _heads()
    before = [p.clone() for p in model.parameters()]
    judge = loss_after_cutting(model, ffn, heads, data, pad)
    uncut, harsh = Candidate([64, 64], [HEADS, HEADS], 0), Candidate([8, 8], [1, 1], 0)

    def loss(m):
        return torch.nn.functional.cross_entropy(predict(m, data, pad), batch["labels"]).item()

    assert judge(uncut) == pytest.approx(loss(model), abs=1e-6)
    assert judge(harsh) == pytest.approx(loss(cut(model, ffn, heads, harsh)), abs=1e-6)
    assert abs(judge(harsh) - judge(uncut)) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # candidates cut copies


def test_joint_budget_without_head_scores_cuts_ffn_only_and_says_when_out_of_reach(classifier):
    from skeleton.budget import plan

    model, _ = classifier
    never = lambda c: pytest.fail("a single candidate needs no judge")  # noqa: E731
    choice, tried = plan(model, ffn_scores(), [], 1.2, text_len=24, judge=never)
    assert choice.heads == [] and sum(choice.ffn) < 128 and len(tried) == 1 and tried[0]["score"] is None
    with pytest.raises(ValueError, match="out of reach"):
        plan(model, ffn_scores(), [], 3.0, text_len=24, judge=never)
    with pytest.raises(ValueError, match="target speed-up must be above 1"):
        plan(model, ffn_scores(), [], 1.0, text_len=24, judge=never)
