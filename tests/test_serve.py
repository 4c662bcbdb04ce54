"""Unplug-and-play serving: one backbone, several task experts, outputs equal to each exported skeleton."""
import copy
import json
import shutil
from pathlib import Path

import helpers
import pytest
import torch

from helpers import mask_ffn
from skeleton import prune
from skeleton.backbones import family_of, load_backbone
from skeleton.folder import ArtifactError, SkeletonFolder
from skeleton.model import AdapterConfig, PromptClassifier
from skeleton.prune import slice_ffn
from skeleton.selection import select
from skeleton.serve import ExpertMismatchError, SkeletonServer, held_bytes

MAX_LENGTH = 12  # short enough that the long text below is truncated
TEXTS = ["a gripping, beautifully made film", "dull", "it was fine, I suppose, though the second half drags on "
         "and on and on without any of the charm of the first", "the worst plot ever", "moving", "sharp and funny"]
# (task, rate, labels, prompt length, prompt method): different rates, label counts, prompt lengths and methods
EXPERTS = [("sst", 0.0, 2, 4, "input"), ("news", 0.5, 3, 2, "input"), ("topic", 0.8, 5, 3, "input"),
           ("intent", 0.0, 3, 2, "prefix"), ("qa", 0.65, 2, 3, "prefix")]


@pytest.fixture(scope="module", params=["bert", "llama"])
def backbone_dir(request, tmp_path_factory, minilm_tokenizer):
    if request.param == "bert":
        return request.getfixturevalue("tiny_backbone_dir")
    from transformers import LlamaModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(helpers.tiny_llama_config(vocab_size=len(minilm_tokenizer))).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def make_expert(backbone_dir, folder, task, rate, num_labels, prompt_length, seed, keep=None, heads=None,
                prompt_method="input", **meta):
    """Export a skeleton with a seeded random adapter and random kept neurons (or the given per-layer `keep`, and
    kept attention `heads`)."""
    backbone, tokenizer = load_backbone(str(backbone_dir))
    labels = [f"{task}{j}" for j in range(num_labels)]
    config = AdapterConfig(num_labels, prompt_length, labels, prompt_method=prompt_method)
    model = PromptClassifier(backbone, config, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0, generator=g)
    if keep is None:
        keep = select([torch.rand(b.down.in_features, generator=g) for b in family_of(backbone).ffn_blocks(backbone)],
                      rate)
    if heads is not None:
        prune.slice_heads(backbone, heads)
        model.prompt.keep_heads(heads)
    slice_ffn(backbone, keep)
    return SkeletonFolder.export(model, tokenizer, keep, folder,
                           {"rate": rate, "task": task, "method": "random", "max_length": MAX_LENGTH,
                            "prompt_method": prompt_method, **meta},
                           **({"heads": heads} if heads is not None else {})).path


@pytest.fixture(scope="module")
def expert_dirs(backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {f"{task}-random-p{rate}" + ("-prefix" if method == "prefix" else ""):
            make_expert(backbone_dir, root / task, task, rate, labels, prompt, seed=i, prompt_method=method)
            for i, (task, rate, labels, prompt, method) in enumerate(EXPERTS)}


@pytest.fixture(scope="module")
def server(backbone_dir, expert_dirs):
    server = SkeletonServer.load(str(backbone_dir))
    for folder in expert_dirs.values():
        server.add(folder)
    return server


def standalone_logits(folder, texts):
    model, tokenizer, _ = SkeletonFolder(folder).load()
    enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"])


def test_outputs_equal_exported_skeletons(server, expert_dirs):
    assert server.names == sorted(expert_dirs)  # named <task>-<method>-p<rate> from neurons.json
    for name, folder in expert_dirs.items():
        got, expected = server.logits(name, TEXTS), standalone_logits(folder, TEXTS)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5, name
        if server.experts[name].meta["rate"] > 0:  # and the expert's network is not the full one
            full = PromptClassifier.from_adapter(server.backbone, Path(folder) / "adapter").eval()
            with torch.no_grad():
                on_full = full(*server.encode(name, TEXTS))
            assert (on_full - expected).abs().max().item() > 1e-3, name
        predictions = server.classify(name, TEXTS)
        labels = server.experts[name].labels
        assert [p.label for p in predictions] == [labels[i] for i in expected.argmax(-1).tolist()]
        probs = torch.tensor([list(p.probabilities.values()) for p in predictions])
        torch.testing.assert_close(probs, torch.softmax(expected, -1), rtol=0, atol=1e-5)


def test_batched_answers_equal_one_by_one(server):
    """Texts of different lengths padded into one batch answer as each text alone (no padding) does."""
    for name in server.names:
        alone = torch.cat([server.logits(name, [text]) for text in TEXTS])
        for batch_size in (2, len(TEXTS)):
            torch.testing.assert_close(server.logits(name, TEXTS, batch_size), alone, rtol=0, atol=1e-5)


def test_concurrent_requests_for_different_tasks_get_their_own_experts(server):
    """Threads asking different experts at once each get their own expert's answers: experts share the backbone's
    tensors but nothing they change per request (a server that swapped weights in and out per request without a
    lock fails this)."""
    from concurrent.futures import ThreadPoolExecutor

    expected = {name: server.logits(name, TEXTS) for name in server.names}
    jobs = [server.names[i % len(server.names)] for i in range(8 * len(server.names))]
    with ThreadPoolExecutor(max_workers=len(server.names)) as pool:
        answers = list(pool.map(lambda name: server.logits(name, TEXTS), jobs))
    for name, got in zip(jobs, answers):
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-6)


def test_switching_back_and_forth_gives_identical_answers(server, backbone_dir):
    full, _ = load_backbone(str(backbone_dir))
    params = {n: p for n, p in server.backbone.named_parameters()}
    first = {name: server.logits(name, TEXTS) for name in server.names}
    for name in [*server.names, *reversed(server.names), *server.names]:
        assert torch.equal(server.logits(name, TEXTS), first[name]), name
        # restored: the backbone's own parameter objects, unchanged
        assert all(p is params[n] for n, p in server.backbone.named_parameters())
    for key, value in full.state_dict().items():
        assert torch.equal(server.backbone.state_dict()[key], value), key


def test_experts_share_every_tensor_they_did_not_change(server):
    """An expert's network holds the backbone's own tensors (the same storage) except its FFN slices; it owns only
    those, its prompt and head: a full-model expert (rate 0) owns no backbone weight at all."""
    backbone = {id(t): n for n, t in server.backbone.named_parameters()}
    memory = server.memory()
    for name in server.names:
        expert = server.experts[name]
        network = dict(expert.model.backbone.named_parameters())
        shared = {n for n, t in network.items() if id(t) in backbone}
        mine = set(network) - shared
        ffn = {n for n in network if any(part in n for part in ("intermediate", "output.dense", "mlp"))
               and "attention" not in n}
        assert mine <= ffn, (name, sorted(mine - ffn))  # embeddings, attention and norms are the backbone's
        query = [expert.model.query] if expert.model.query is not None else []
        adapter = held_bytes(expert.model.prompt, expert.model.head, *query, *expert.keep)
        assert bool(mine) == (expert.meta["rate"] > 0), name
        assert memory[name] == held_bytes(*(network[n] for n in mine)) + adapter, name
    assert memory["backbone"] == held_bytes(server.backbone)


def test_mixed_requests_are_grouped_by_task_in_request_order(server, monkeypatch):
    names = server.names
    requests = [(names[i % len(names)], text) for i, text in enumerate(TEXTS * 2)]
    calls = []
    classify = server.classify
    monkeypatch.setattr(server, "classify", lambda name, texts, *a: (calls.append(name), classify(name, texts, *a))[1])
    answers = server.serve(requests)
    monkeypatch.undo()
    assert sorted(calls) == names  # one batch per task, not one per request
    assert server.serve([]) == [] and server.classify(names[0], []) == []
    assert [a.task for a in answers] == [task for task, _ in requests]
    for name in names:
        mine = [i for i, (task, _) in enumerate(requests) if task == name]
        alone = server.classify(name, [requests[i][1] for i in mine])
        assert [answers[i] for i in mine] == alone


def test_unknown_task_lists_loaded_experts(server):
    with pytest.raises(KeyError, match=r"unknown task expert 'nope'; known: intent-random-p0.0-prefix, news-random-p0.5, "):
        server.classify("nope", TEXTS)
    with pytest.raises(KeyError, match="unknown task expert 'nope'"):
        server.serve([(server.names[0], "fine"), ("nope", "fine")])


def test_corrupt_expert_is_refused(backbone_dir, expert_dirs, tmp_path):
    folder = shutil.copytree(expert_dirs["news-random-p0.5"], tmp_path / "news")
    weights = folder / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    server = SkeletonServer(*load_backbone(str(backbone_dir)))
    with pytest.raises(ArtifactError, match="expert 'corrupt': .*adapter_model.safetensors.*corrupt"):
        server.add(folder, name="corrupt")
    assert server.names == []


def test_expert_of_another_backbone_is_refused(backbone_dir, minilm_tokenizer, tmp_path):
    other_dir = tmp_path / "other-backbone"
    backbone, _ = load_backbone(str(backbone_dir))
    torch.manual_seed(1)  # same architecture, different weights
    type(backbone)(backbone.config).save_pretrained(other_dir)
    minilm_tokenizer.save_pretrained(other_dir)
    foreign = make_expert(other_dir, tmp_path / "foreign", "sst", 0.5, 2, 4, seed=0)
    server = SkeletonServer(*load_backbone(str(backbone_dir)), source="tiny")
    with pytest.raises(ExpertMismatchError, match=r"expert 'sst-random-p0.5' .* is not an expert of backbone "
                                                   r"'tiny': .* differs from the backbone's"):
        server.add(foreign)
    # Same weights, different architecture setting: refused by the config check.
    twisted = make_expert(backbone_dir, tmp_path / "twisted", "sst", 0.5, 2, 4, seed=0)
    config_path = twisted / "backbone" / "config.json"
    config = json.loads(config_path.read_text())
    key = "layer_norm_eps" if "layer_norm_eps" in config else "rms_norm_eps"
    config[key] = 0.5
    config_path.write_text(json.dumps(config))
    manifest = json.loads((twisted / "manifest.json").read_text())
    from skeleton.io import file_sha256

    manifest["backbone/config.json"] = file_sha256(config_path)
    (twisted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpertMismatchError, match=f"config differs in {key}"):
        server.add(twisted)
    assert server.names == []


def test_per_layer_widths(backbone_dir, tmp_path):
    backbone, tokenizer = load_backbone(str(backbone_dir))
    if not getattr(family_of(backbone), "per_layer_shapes", False):
        pytest.skip(f"{type(family_of(backbone)).__name__} exports no per-layer FFN widths")
    widths = [b.down.in_features for b in family_of(backbone).ffn_blocks(backbone)]
    g = torch.Generator().manual_seed(3)
    keep = [torch.sort(torch.randperm(w, generator=g)[: w // (2 + i)]).values for i, w in enumerate(widths)]
    assert len({len(k) for k in keep}) > 1
    folder = make_expert(backbone_dir, tmp_path / "uneven", "uneven", 0.6, 3, 2, seed=5, keep=keep)
    server = SkeletonServer(backbone, tokenizer)
    name = server.add(folder)
    torch.testing.assert_close(server.logits(name, TEXTS), standalone_logits(folder, TEXTS), rtol=0, atol=1e-5)
    # and against the oracle: the full model with the dropped neurons' down-projection columns zeroed
    oracle = PromptClassifier.from_adapter(copy.deepcopy(server.backbone), folder / "adapter").eval()
    mask_ffn(oracle.backbone, keep)
    with torch.no_grad():
        expected = oracle(*server.encode(name, TEXTS))
    torch.testing.assert_close(server.logits(name, TEXTS), expected, rtol=0, atol=1e-5)


def test_pruned_heads(tmp_path, minilm_tokenizer):
    """Experts with pruned attention heads (and uneven FFN widths) plug in too, where the family knows heads."""
    from transformers import BertModel

    torch.manual_seed(2)
    backbone_dir = tmp_path / "four-heads"
    BertModel(helpers.tiny_bert_config(num_attention_heads=4)).save_pretrained(backbone_dir)
    minilm_tokenizer.save_pretrained(backbone_dir)
    heads = [torch.tensor([0, 2, 3]), torch.tensor([1])]
    g = torch.Generator().manual_seed(4)
    keep = [torch.sort(torch.randperm(64, generator=g)[:w]).values for w in (40, 16)]
    folder = make_expert(backbone_dir, tmp_path / "heads", "heads", 0.5, 3, 2, seed=6, keep=keep, heads=heads,
                         prompt_method="prefix")  # its prefix keeps the kept heads' keys and values
    plain = make_expert(backbone_dir, tmp_path / "plain", "plain", 0.5, 2, 2, seed=7)
    server = SkeletonServer.load(str(backbone_dir))
    name, other = server.add(folder), server.add(plain)
    for _ in range(2):  # back and forth: the backbone keeps its head counts
        torch.testing.assert_close(server.logits(name, TEXTS), standalone_logits(folder, TEXTS), rtol=0, atol=1e-5)
        torch.testing.assert_close(server.logits(other, TEXTS), standalone_logits(plain, TEXTS), rtol=0, atol=1e-5)
    assert [block.num_heads for block in family_of(server.backbone).attention_blocks(server.backbone)] == [4, 4]


def test_duplicate_name_is_refused(server, expert_dirs):
    with pytest.raises(ValueError, match="already loaded"):
        server.add(expert_dirs["sst-random-p0.0"])


def run_cli(capsys, *args, stdin: str = "") -> str:
    """The stdout of `skeleton list|classify ARGS`, which must succeed."""
    code, out, err = helpers.run_skeleton(capsys, *args, stdin=stdin)
    assert code == 0, err[-3000:]
    return out


def test_cli_list_and_classify(capsys, server, expert_dirs, backbone_dir):
    root = expert_dirs["sst-random-p0.0"].parent
    listing = run_cli(capsys, "list", "--skeletons", root)
    for name, folder in expert_dirs.items():
        assert any(line.startswith(name) and line.endswith(str(folder)) for line in listing.splitlines()), listing
    out = run_cli(capsys, "classify", "--skeletons", root, "--backbone", backbone_dir, "--task", "news", "--json",
                  *TEXTS[:2])
    expected = server.classify("news-random-p0.5", TEXTS[:2])
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["label"] for g in got] == [p.label for p in expected]
    for g, p in zip(got, expected):
        assert g["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
    plain = run_cli(capsys, "classify", "--skeletons", root, "--backbone", backbone_dir, "--task", "topic-random-p0.8",
                    stdin="\n".join(TEXTS) + "\n")
    expected = [p.label for p in server.classify("topic-random-p0.8", TEXTS)]
    assert [line.split("\t")[0] for line in plain.splitlines()] == expected


def test_cli_lists_and_serves_experts_logged_to_mlflow(capsys, server, expert_dirs,
                                                       backbone_dir):
    import mlflow

    from tasks import tracking
    from tasks.results import FULL

    parent = tracking.start_sweep_run.fn("test-serve", {"task": "news", "backbone": str(backbone_dir)})
    point = tracking.log_point.fn(parent, {"seed": 0, "method": "random", "rate": 0.5, "head_rate": 0.0, "kept_width": 32,
                                           "path": str(expert_dirs["news-random-p0.5"]), "val_accuracy": 0.5})
    # a sweep's reference model has a child run too (tracking.log_point): listed by the sweep, never an expert
    tracking.log_point.fn(parent, {"seed": 0, "method": FULL, "path": str(expert_dirs["topic-random-p0.8"])})
    listing = run_cli(capsys, "list", "--run", parent)
    model_id = mlflow.MlflowClient().get_run(point).data.tags["skeleton.model_id"]
    assert "news-random-p0.5" in listing and f"models:/{model_id}" in listing, listing
    assert len(listing.strip().splitlines()) == 2, listing  # the header and the one skeleton: no full model
    assert "news-random-p0.5" in run_cli(capsys, "list", "--mlflow", "--experiment", "test-serve")
    out = run_cli(capsys, "classify", "--run", point, "--task", "news-random-p0.5", "--json", TEXTS[0])
    assert json.loads(out)["label"] == server.classify("news-random-p0.5", TEXTS[:1])[0].label


def test_experts_built_by_the_pipeline_stages(backbone_dir, reviews_csv, tmp_path):
    """Skeletons made by the sweep's stages record task, method, backbone and max_length: served by name. A
    reconstructed one carries its own refit down projections (weights, and the bias where the family has one), one
    re-tuned with tune_norms its own normalisation layers, and so does one cut from a full model prompt-tuned with
    tune_norms; plugging any of them in and out leaves the others' answers as they were."""
    from skeleton import stages
    from skeleton.specs import AttributeSpec, BuildSpec, DataSpec, TuneSpec
    from skeleton.train import TrainConfig

    data = stages.prepare_data(tmp_path / "data", DataSpec("reviews", str(backbone_dir), max_length=16,
                                                           data_file=str(reviews_csv), text_column="review",
                                                           label_column="sentiment"))
    train_config = {"steps": 2, "batch_size": 8, "eval_every": 2, "warmup_steps": 1}
    full = stages.tune_prompt(tmp_path / "full", TuneSpec(data["path"], str(backbone_dir), 4,
                                                          TrainConfig(**train_config)))
    scores = stages.attribute(tmp_path / "scores", AttributeSpec(data["path"], full["path"], "grad_x_act", examples=16))
    texts = ["review 1: a great and moving film " * 4, "dull"]
    server = None
    served = {}  # expert name -> the logits of its exported skeleton

    def serve(folder: str) -> str:
        """Serve an exported folder; check the server answers as the folder does, and unlike any other expert."""
        nonlocal server
        if server is None:
            server = SkeletonServer.load(json.loads((Path(folder) / "neurons.json").read_text())["backbone"])
            served[server.add(full["path"])] = None
        name = server.add(folder)
        model, tokenizer, _ = SkeletonFolder(folder).load()
        enc = tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
        with torch.no_grad():
            served[name] = model(enc["input_ids"], enc["attention_mask"])
        assert all(not torch.allclose(served[name], other, atol=1e-4) for other in served.values()
                   if other is not None and other is not served[name])
        torch.testing.assert_close(server.logits(name, texts), served[name], rtol=0, atol=1e-5)
        return name

    def build(folder: str, config: dict, parent: str = full["path"], **options) -> str:
        built = stages.build_skeleton(tmp_path / folder, BuildSpec(data["path"], parent, scores["path"], 0.5,
                                                                   TrainConfig(**config), **options))
        return serve(built["path"])

    assert build("sk", train_config) == "reviews-grad_x_act-p0.5"
    meta = json.loads((Path(server.experts["reviews-grad_x_act-p0.5"].folder) / "neurons.json").read_text())
    assert (meta["task"], meta["method"], meta["backbone"], meta["max_length"]) == (
        "reviews", "grad_x_act", str(backbone_dir), 16)
    assert {p.label for p in server.classify("reviews-full-p0.0", texts)} <= {"neg", "pos"}
    served["reviews-full-p0.0"] = server.logits("reviews-full-p0.0", texts)
    assert build("rebuilt", train_config, reconstruct=True) == "reviews-grad_x_act-p0.5-rec"
    assert build("normed", {**train_config, "tune_norms": True, "lr_head": 0.1},
                 reconstruct=True) == "reviews-grad_x_act-p0.5-rec-norms"
    normed_full = stages.tune_prompt(tmp_path / "normed-full", TuneSpec(data["path"], str(backbone_dir), 4, TrainConfig(
        **train_config, tune_norms=True, lr_head=0.1)))
    assert serve(normed_full["path"]) == "reviews-full-p0.0-norms"
    assert build("inherited", train_config, parent=normed_full["path"]) == "reviews-grad_x_act-p0.5-norms"
    for name, want in served.items():  # plugging the others in and out left every answer as it was
        torch.testing.assert_close(server.logits(name, texts), want, rtol=0, atol=1e-5)


def test_expert_names():
    from skeleton.folder import model_name as default_name

    assert default_name({"task": "rt", "method": "grad_x_act", "rate": 0.65}, "x") == "rt-grad_x_act-p0.65"
    assert default_name({"task": "rt", "rate": 0.0}, "x") == "rt-full-p0.0"
    assert default_name({"task": "rt", "method": "m", "rate": 0.5, "head_rate": 0.25, "allocation": "global"},
                        "x") == "rt-m-p0.5-h0.25-global"
    assert default_name({"task": "rt", "method": "m", "rate": 0.5, "reconstruct": True}, "x") == "rt-m-p0.5-rec"
    assert default_name({"task": "rt", "method": "m", "rate": 0.5, "tune_norms": True}, "x") == "rt-m-p0.5-norms"
    assert default_name({"rate": 0.5}, "/skeletons/abc123") == "abc123"  # exported before the task was recorded


def test_length_batches_cut_padding_at_least_cost():
    """Every text once, batches of at most max_size, and no grouping costs fewer padded positions plus pass costs
    (brute force over every way to cut the length-sorted texts)."""
    import itertools
    import random

    from skeleton.serve import length_batches

    def cost(batches, lengths, pass_cost):
        return sum(pass_cost + len(b) * max(lengths[i] for i in b) for b in batches)

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 9))]
        max_size, pass_cost = rng.randint(1, 5), rng.choice([0, 8, 32, 200])
        batches = length_batches(lengths, max_size, pass_cost)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(0 < len(b) <= max_size for b in batches)
        ordered = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(cost([ordered[a:b] for a, b in zip((0, *cuts), (*cuts, len(ordered)))], lengths, pass_cost)
                   for k in range(len(ordered)) for cuts in itertools.combinations(range(1, len(ordered)), k)
                   if all(b - a <= max_size for a, b in zip((0, *cuts), (*cuts, len(ordered)))))
        assert cost(batches, lengths, pass_cost) == best
    assert length_batches([3, 1, 2], 2, None) == [[1, 2], [0]]  # no pass cost given: full batches, by length
