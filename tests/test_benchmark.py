"""The latency harness: MAC counts against hand computations (BERT, LLaMA with grouped KV heads, pruned shapes),
the benchmark's rows and reports, executions side by side, the CPU peak-memory measure, the GPU path (skipped
without one) and the script (demo models from a shape's config.json alone)."""
import copy
import csv
import json
import shutil

import pytest
import torch
from torch import nn

from helpers import tiny_bert_config
from skeleton.benchmark import BenchmarkConfig, _peak_bytes, at, benchmark, markdown, write_report
from skeleton.macs import count_macs
from skeleton.model import AdapterConfig, PromptClassifier

B, T, M = 2, 6, 4  # batch, text tokens, prompt vectors
S = T + M  # positions per example


def bert(**overrides):
    from transformers import BertModel

    torch.manual_seed(0)
    backbone = BertModel(tiny_bert_config(vocab_size=2000, **overrides))
    return PromptClassifier(backbone, AdapterConfig(num_labels=3, prompt_length=M, pooling="mean")).eval()


def llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return PromptClassifier(LlamaModel(config), AdapterConfig(num_labels=3, prompt_length=M, pooling="mean")).eval()


def hooked_linear_macs(model):
    """Multiply-adds of every nn.Linear of the backbone as executed in a real forward pass (the oracle)."""
    total = 0

    def count(module, args, _out):
        nonlocal total
        total += args[0].numel() // module.in_features * module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(torch.randint(0, 2000, (B, T)), torch.ones(B, T, dtype=torch.long))
    for h in handles:
        h.remove()
    return total


def test_macs_of_a_tiny_bert_by_hand():
    macs = count_macs(bert(), B, T)
    # Per position and layer: Q, K, V, O (32x32 each) + FFN up (32x64) and down (64x32); 2 layers.
    assert macs.projections == B * S * 2 * (4 * 32 * 32 + 2 * 32 * 64) + B * 32 * 32  # + the pooler, on [CLS]
    # Scores and weighted values: per position, S per query dimension (2 heads x 16 = 32), each; 2 layers.
    assert macs.attention == 2 * (2 * B * S * S * 32)
    assert macs.head == B * 32 * 3
    assert macs.total == macs.projections + macs.attention + macs.head
    assert macs.projections == hooked_linear_macs(bert())


def test_macs_of_a_tiny_llama_with_grouped_kv_heads_by_hand():
    model = llama()
    macs = count_macs(model, B, T)
    # head_dim 8: Q and O 32x32, K and V 32x16 (2 KV heads); gate, up 32x64 and down 64x32; no pooler.
    assert macs.projections == B * S * 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    assert macs.attention == 2 * (2 * B * S * S * 4 * 8)  # 4 query heads read the shared KV heads
    assert macs.head == B * 32 * 3
    assert macs.projections == hooked_linear_macs(model)


def test_macs_follow_pruned_heads_and_per_layer_widths():
    model = bert()
    layers = model.backbone.encoder.layer
    # Layer 0 keeps 1 of its 2 heads (16 of 32 dims) and 40 FFN neurons; layer 1 keeps both heads and 24 neurons.
    attention = layers[0].attention
    attention.self.query, attention.self.key, attention.self.value = (nn.Linear(32, 16) for _ in range(3))
    attention.output.dense = nn.Linear(16, 32)
    attention.self.num_attention_heads, attention.self.all_head_size = 1, 16
    for layer, width in zip(layers, (40, 24)):
        layer.intermediate.dense, layer.output.dense = nn.Linear(32, width), nn.Linear(width, 32)
    macs = count_macs(model, B, T)
    layer0 = 3 * 32 * 16 + 16 * 32 + 2 * 32 * 40
    layer1 = 4 * 32 * 32 + 2 * 32 * 24
    assert macs.projections == B * S * (layer0 + layer1) + B * 32 * 32
    assert macs.attention == 2 * B * S * S * (16 + 32)
    assert macs.projections == hooked_linear_macs(model)  # the pruned model runs, and the count is what ran


def test_count_macs_refuses_an_unknown_attention_layout():
    model = bert()
    for layer in model.backbone.encoder.layer:
        layer.attention.self.q = layer.attention.self.query  # renamed: the count must not silently skip it
        del layer.attention.self.query
    with pytest.raises(ValueError, match="found 0 query projections"):
        count_macs(model, B, T)


def sliced(model, widths):
    """A copy with the FFN of each layer cut to the first `widths[i]` neurons."""
    from skeleton.prune import slice_ffn

    skeleton = copy.deepcopy(model)
    slice_ffn(skeleton.backbone, [torch.arange(w) for w in widths])
    return skeleton


def test_benchmark_rows_bound_memory_and_report(tmp_path):
    full = bert(intermediate_size=512)
    models = {"full": full, "half": sliced(full, [256, 256])}
    threads = torch.get_num_threads()
    config = BenchmarkConfig(batch_sizes=[2, 4], lengths=[8], repeats=3, warmup=1, threads=1)
    result = benchmark(models, config)
    rows = result["rows"]
    assert torch.get_num_threads() == threads  # restored
    env = result["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["attention"] == ["sdpa"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [("full", 2), ("half", 2), ("full", 4), ("half", 4)]
    for r in rows:
        assert r["repeats"] == 3 and r["seq_len"] == 8 + M and r["latency_ms"] > 0 and r["peak_mem_mb"] > 0
        assert r["latency_p10_ms"] <= r["latency_ms"] <= r["latency_p90_ms"]
        assert r["throughput"] == pytest.approx(r["batch_size"] / r["latency_ms"] * 1e3)
        assert r["bound_ratio"] == pytest.approx(r["speedup"] / r["speedup_bound"])
    by_model = {(r["model"], r["batch_size"]): r for r in rows}
    assert by_model["full", 2]["speedup"] == 1.0 and by_model["full", 2]["speedup_bound"] == 1.0
    bound = by_model["half", 2]["speedup_bound"]
    expected = count_macs(full, 2, 8).total / count_macs(models["half"], 2, 8).total
    assert bound == pytest.approx(expected) and 1.2 < bound < 2
    assert by_model["half", 2]["peak_mem_mb"] < by_model["full", 2]["peak_mem_mb"] < by_model["full", 4]["peak_mem_mb"]
    assert by_model["half", 2]["parameters"] < by_model["full", 2]["parameters"]

    paths = write_report(result, tmp_path)
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {"speedup", "speedup_bound", "bound_ratio", "peak_mem_mb", "cpu_ms"} <= set(table[0])
    text = paths["markdown"].read_text()
    assert "## batch 4, 8 text tokens + 4 prompt = 12 positions" in text and "| half |" in text
    assert json.loads(paths["json"].read_text())["environment"]["threads"] == 1


def test_executions_stand_side_by_side(monkeypatch):
    """Every model in every execution, in the same rounds: speed-ups within an execution, gains over eager. (torch
    .compile is the identity here: the plumbing; test_execution compiles for real.)"""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    full = bert(intermediate_size=512)
    models = {"full": full, "half": sliced(full, [256, 256])}
    config = BenchmarkConfig(batch_sizes=[2], lengths=[8], repeats=3, warmup=1, executions=("eager", "compile"))
    result = benchmark(models, config)
    rows = result["rows"]
    assert [(r["model"], r["execution"]) for r in rows] == [("full", "eager"), ("half", "eager"), ("full", "compile"),
                                                            ("half", "compile")]
    by = {(r["model"], r["execution"]): r for r in rows}
    assert by["full", "compile"]["speedup"] == 1.0 and by["half", "compile"]["speedup_bound"] > 1.2
    assert by["half", "compile"]["execution_speedup"] > 0 and by["half", "compile"]["prepare_s"] > 0
    assert by["half", "eager"]["execution_speedup"] is None and by["half", "eager"]["prepare_s"] is None
    assert by["half", "eager"]["peak_mem_mb"] > 0 and "peak_mem_mb" not in by["half", "compile"]
    assert result["environment"]["executions"] == ["eager", "compile"]
    assert result["environment"]["compile_mode"] == "default"
    assert at(result, 2, 8, "compile")["half"] is by["half", "compile"] and at(result, 2, 8)["half"] is by["half", "eager"]
    text = markdown(result)
    assert "| model | bound | eager ms | eager speed-up | compile ms | compile speed-up | compile / eager |" in text
    assert "| half | compile |" in text
    assert "| execution |" not in markdown(benchmark(models, BenchmarkConfig(batch_sizes=[2], lengths=[8], repeats=2)))


def test_time_budget_caps_the_rounds():
    full = bert()
    config = BenchmarkConfig(batch_sizes=[2], lengths=[8], repeats=50, min_repeats=3, budget_s=1e-6, memory=False)
    rows = benchmark({"full": full, "copy": copy.deepcopy(full)}, config)["rows"]
    assert [r["repeats"] for r in rows] == [3, 3] and "peak_mem_mb" not in rows[0]
    assert rows[1]["speedup_bound"] == 1.0


def test_cpu_peak_memory_is_the_largest_live_set():
    x = torch.randn(256, 1024)  # 1 MiB, allocated before: not counted

    def chain():
        a = x.exp()  # 1 MiB live
        b = a.neg()  # 2 MiB live
        del a
        c = b.abs()  # 2 MiB live again
        return c

    def wide():
        return torch.cat([x, x, x])  # 3 MiB

    peaks = _peak_bytes({"chain": chain, "wide": wide}, torch.device("cpu"))
    assert peaks == {"chain": 2 * 2**20, "wide": 3 * 2**20}


def test_config_is_validated():
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchmarkConfig(batch_sizes=[])
    with pytest.raises(ValueError, match="lengths"):
        BenchmarkConfig(lengths=[0])
    with pytest.raises(ValueError, match="unknown dtype"):
        BenchmarkConfig(dtype="fp8")
    with pytest.raises(ValueError, match="device must be"):
        BenchmarkConfig(device="mps")
    with pytest.raises(ValueError, match="unknown execution mode 'jit'"):
        BenchmarkConfig(executions=("eager", "jit"))
    with pytest.raises(ValueError, match="executions must name at least one"):
        BenchmarkConfig(executions=())
    with pytest.raises(ValueError, match="'graph' replays CUDA graphs: it needs a CUDA device"):
        BenchmarkConfig(executions=("eager", "graph"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            BenchmarkConfig(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_on_cuda():
    full = bert(intermediate_size=512)
    models = {"full": full, "half": sliced(full, [256, 256])}
    result = benchmark(models, BenchmarkConfig(batch_sizes=[4], lengths=[8], repeats=3, device="cuda"))
    assert result["environment"]["device_name"] == torch.cuda.get_device_name()
    assert all(r["latency_ms"] > 0 and r["peak_mem_mb"] > 0 for r in result["rows"])
    assert next(iter(full.parameters())).device.type == "cuda"
    bf16 = benchmark({"full": full}, BenchmarkConfig(batch_sizes=[4], lengths=[8], repeats=2, device="cuda",
                                                     dtype="bfloat16", executions=("eager", "graph")))
    assert [r["execution"] for r in bf16["rows"]] == ["eager", "graph"] and bf16["rows"][1]["latency_ms"] > 0


def test_speedup_plot(tmp_path):
    from tasks.report import plot_speedup
    from tasks.results import FULL, PROBE

    common = {"seed": 0, "head_rate": 0.0, "accuracy": 0.8}
    records = [{**common, "method": FULL, "point": "", "rate": 0.0, "speedup": 1.0},
               {**common, "method": PROBE, "point": "", "rate": 0.0, "speedup": None}]
    records += [{**common, "method": m, "point": f"p={r} h=0", "rate": r, "speedup": s, "speedup_bound": b,
                 "bound_ratio": s / b}
                for m in ("grad_x_act", "random") for r, s, b in ((0.5, 1.4, 1.47), (0.8, 1.9, 2.07))]
    assert plot_speedup(records, tmp_path / "speedup.png").stat().st_size > 0


@pytest.fixture(scope="module")
def script():
    from flows.commands import benchmark

    return benchmark


TINY_GRID = ["--batch-sizes", "2", "--lengths", "8", "--repeats", "2", "--warmup", "1", "--budget", "0"]


def test_script_demo_then_explicit_folders_then_artifact_scan(script, tiny_backbone_dir, tmp_path, capsys):
    assert script.main(["--demo", "--backbone", str(tiny_backbone_dir), "--rates", "0.5", "--prompt-length", "4",
                        "--out", str(tmp_path / "demo"), *TINY_GRID]) == 0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| random p=0.5 |" in printed and "of bound" in printed
    demo = json.loads((tmp_path / "demo" / "benchmark.json").read_text())
    folders = {r["model"]: r["path"] for r in demo["rows"]}
    assert {r["repeats"] for r in demo["rows"]} == {2}

    # The same folders named explicitly (in any order): the rate-0 one is the reference.
    assert script.main(["--skeletons", folders["random p=0.5"], folders["full"], "--out", str(tmp_path / "explicit"),
                        *TINY_GRID]) == 0
    rows = json.loads((tmp_path / "explicit" / "benchmark.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["full", "random p=0.5"] and rows[1]["kept_width"] == 32

    # Laid out like a sweep's artifacts folder: found by scanning it.
    artifacts = tmp_path / "artifacts"
    shutil.copytree(folders["full"], artifacts / "models" / "m1")
    shutil.copytree(folders["random p=0.5"], artifacts / "skeletons" / "s1")
    found = script.from_artifacts(artifacts, "random", [0.5])
    assert found == {"full": artifacts / "models" / "m1", "random p=0.5": artifacts / "skeletons" / "s1"}
    assert script.from_artifacts(artifacts, "random", [0.5, 0.8]) is None  # not every rate: no match


def test_script_random_init_needs_no_weights(script, tiny_backbone_dir, tmp_path):
    """The fresh-GPU-machine path: the backbone folder holds only config.json and the tokenizer, or a config.json
    alone: demo models are built in memory."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_backbone_dir, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(OSError):  # no weights: the ordinary loader refuses
        script.main(["--demo", "--backbone", str(bare), "--rates", "0.5", "--out", str(tmp_path / "x"), *TINY_GRID])
    assert script.main(["--demo", "--backbone", str(bare), "--random-init", "--rates", "0.5", "--no-memory",
                        "--out", str(tmp_path / "out"), *TINY_GRID]) == 0
    rows = json.loads((tmp_path / "out" / "benchmark.json").read_text())["rows"]
    assert len(rows) == 2 and rows[1]["speedup_bound"] > 1 and "peak_mem_mb" not in rows[0]
    config = tmp_path / "shape.json"  # a hand-written config.json: no tokenizer, no weights
    config.write_text((tiny_backbone_dir / "config.json").read_text())
    assert script.main(["--demo", "--backbone", str(config), "--random-init", "--rates", "0.5", "--no-memory",
                        "--prompt-methods", "input", "prefix", "--out", str(tmp_path / "json"), *TINY_GRID]) == 0
    rows = json.loads((tmp_path / "json" / "benchmark.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["full", "full (prefix)", "random p=0.5", "prefix random p=0.5"]
    with pytest.raises(SystemExit):  # a config.json holds no weights
        script.main(["--demo", "--backbone", str(config), "--out", str(tmp_path / "y"), *TINY_GRID])


def test_shipped_shapes_build_the_architectures_they_name(script):
    """The hand-written configs (flows/commands/shapes/): their parameter counts, on the meta device."""
    from transformers import AutoConfig, AutoModel

    expected = {"minilm-l6": 22_713_216, "bert-base": 109_482_240, "llama2-7b": 6_607_343_616}
    assert {p.stem for p in script.SHAPES.glob("*.json")} == set(expected)
    for name, count in expected.items():
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(script.shape_config(name)))
        assert sum(p.numel() for p in model.parameters()) == count, name
    with pytest.raises(ValueError, match="or a shape: bert-base, llama2-7b, minilm-l6"):
        script.shape_config("bert-huge")


def test_stage_benchmark_runs_in_a_fresh_process_against_every_baseline(tmp_path, minilm_tokenizer):
    """The sweep's benchmark stage: a new process (the sweep's own trained-in process skews wide passes), rows
    with a speed-up and bound against each baseline folder, paired per round."""
    from skeleton import stages
    from skeleton.folder import SkeletonFolder
    from skeleton.specs import BenchmarkSpec
    from skeleton.prune import slice_ffn
    from skeleton.selection import select

    folders = {}
    for name, rate, method in (("input", 0.0, "input"), ("prefix", 0.0, "prefix"), ("cut", 0.5, "prefix")):
        model = PromptClassifier(bert().backbone, AdapterConfig(num_labels=3, prompt_length=M, prompt_method=method))
        keep = select([torch.rand(64, generator=torch.Generator().manual_seed(1)) for _ in range(2)], rate)
        slice_ffn(model.backbone, keep)
        folders[name] = str(SkeletonFolder.export(model, minilm_tokenizer, keep, tmp_path / name, {"rate": rate}))
    result = stages.benchmark(tmp_path / "out", BenchmarkSpec(folders["input"], [folders["cut"]], [2], [8], repeats=3,
                                                              baselines=[folders["prefix"]]))
    assert result["environment"]["threads"] >= 1
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == set(folders.values())
    cut = rows[folders["cut"]]
    assert cut["seq_len"] == 8 and rows[folders["input"]]["seq_len"] == 8 + M  # a prefix runs no positions
    assert set(cut["speedups"]) == set(cut["bounds"]) == {folders["prefix"]}
    assert cut["speedup_bound"] > cut["bounds"][folders["prefix"]] > 1.0  # the input prompt costs more positions
    assert cut["speedups"][folders["prefix"]] > 0



def test_script_names_folders_of_every_prompt_method_and_picks_the_input_full_model(script, tmp_path,
                                                                                    minilm_tokenizer):
    from skeleton.folder import SkeletonFolder
    from skeleton.prune import slice_ffn
    from skeleton.selection import select

    def export(name, rate, method="input", **meta):
        model = PromptClassifier(bert().backbone, AdapterConfig(num_labels=3, prompt_length=M, prompt_method=method))
        keep = select([torch.rand(64, generator=torch.Generator().manual_seed(1)) for _ in range(2)], rate)
        slice_ffn(model.backbone, keep)
        meta = {"rate": rate, "prompt_method": method, "method": "grad_x_act" if rate else None, **meta}
        return str(SkeletonFolder.export(model, minilm_tokenizer, keep, tmp_path / name, meta))

    folders = [export("prefix-cut", 0.5, "prefix"), export("tuned", 0.0, finetune=True), export("full", 0.0),
               export("prefix-full", 0.0, "prefix"), export("cut", 0.5)]
    named = script.skeleton_folders(folders)
    assert list(named) == ["full", "prefix grad_x_act p=0.5", "fine-tuned", "full (prefix)", "grad_x_act p=0.5"]
    assert named["full"].name == "full"
    with pytest.raises(SystemExit, match="exactly one input-prompt full model"):
        script.skeleton_folders(folders[:2])


def test_gpu_bench_dry_run_on_the_cpu(tmp_path):
    """The prepared GPU run's plumbing on tiny shapes: steps that need CUDA graphs fail over to eager, and the
    table, the report and the log are written."""
    from flows.commands import gpu_bench

    code = gpu_bench.main(["--device", "cpu", "--tiny", "--only", "bert-base", "llama2-7b-compile",
                           "--out", str(tmp_path)])
    assert code == 1  # the graph steps failed over (no CUDA here): said in the exit code and the report
    state = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [r["step"] for r in state["results"]] == ["bert-base", "llama2-7b-compile"]
    assert set(state["errors"]) == {"bert-base", "llama2-7b-compile"}
    text = (tmp_path / "gpu_bench.md").read_text()
    assert "| bert-base, batch 2 | eager |" in text and "| llama2-7b, batch 2 | eager |" in text
    assert "prefix p=0.65 / input p=0.65" in text and "step bert-base" in (tmp_path / "gpu_bench.log").read_text()
