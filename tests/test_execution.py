"""The execution runner (skeleton/execution.py): padded shape buckets give eager's logits (float32, 1e-5) for both
families and both prompt methods, batches past the largest bucket are split and texts past it run eagerly,
torch.compile on the CPU equals eager, calls from several threads get their own answers, and CUDA graphs (with a
GPU only) equal eager in float32 and bfloat16."""
import threading

import pytest
import torch

from helpers import encode
from skeleton.execution import Runner, bucket, check_mode
from skeleton.model import AdapterConfig, PromptClassifier

TEXTS = ["a gripping , beautifully made film", "dull and far too long", "it was fine", "the worst plot ever",
         "great", "a sharp and funny film , bold and tender and brilliant"]


def with_method(model, method):
    """A classifier of `method` on the same backbone, with a trained-looking head."""
    if method == model.config.prompt_method:
        return model
    other = PromptClassifier(model.backbone, AdapterConfig(3, 4, prompt_method=method), seed=1)
    with torch.no_grad():
        other.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return other.eval()


def eager(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


def test_buckets_and_modes():
    assert [bucket(n, (2, 4, 8)) for n in (1, 2, 3, 8, 9)] == [2, 2, 4, 8, None]
    check_mode("compile", "cpu")
    with pytest.raises(ValueError, match="unknown execution mode 'jit'; known: eager, graph, compile"):
        check_mode("jit")
    with pytest.raises(ValueError, match="'graph' replays CUDA graphs: it needs a CUDA device"):
        check_mode("graph", "cpu")


@pytest.mark.parametrize("method", ["input", "prefix"])
def test_padded_buckets_give_eager_logits(tiny_family, method):
    model, tokenizer, _ = tiny_family
    model = with_method(model, method)
    batch = encode(tokenizer, TEXTS, labels=[0] * len(TEXTS))
    expected = eager(model, batch)
    runner = Runner(model, "eager", batch_buckets=(2, 4), length_buckets=(4, 8, 16), pad=True)
    got = runner(batch["input_ids"], batch["attention_mask"])  # 6 rows: a chunk of 4 and one of 2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert set(runner.prepared) <= {(4, 8), (4, 16), (2, 8), (2, 16)} and runner.eager_fallbacks == 0
    for rows in (slice(0, 1), slice(1, 4), slice(2, 3)):  # fewer rows and shorter texts than a bucket
        part = {k: v[rows] for k, v in batch.items()}
        width = int(part["attention_mask"].sum(1).max())
        got = runner(part["input_ids"][:, :width], part["attention_mask"][:, :width])
        torch.testing.assert_close(got, expected[rows], rtol=0, atol=1e-5)
    short = Runner(model, "eager", batch_buckets=(8,), length_buckets=(4,), pad=True)  # every text is longer
    torch.testing.assert_close(short(batch["input_ids"], batch["attention_mask"]), expected, rtol=0, atol=1e-5)
    assert short.eager_fallbacks == 1


def test_compile_on_the_cpu_equals_eager(tiny_backbone_dir, minilm_tokenizer):
    """torch.compile ("default" mode on a CPU) over one bucket: a prefix model, whose cache dynamo must trace."""
    from helpers import classifier_on

    model = with_method(classifier_on(tiny_backbone_dir)[0], "prefix")
    batch = encode(minilm_tokenizer)
    runner = Runner(model, "compile", batch_buckets=(4,), length_buckets=(16,))
    assert runner.compile_mode == "default"
    torch.testing.assert_close(runner(batch["input_ids"], batch["attention_mask"]), eager(model, batch),
                               rtol=0, atol=1e-5)
    assert list(runner.prepared) == [(4, 16)] and runner.prepared[4, 16] > 0
    torch.testing.assert_close(runner(batch["input_ids"][:2], batch["attention_mask"][:2]), eager(model, batch)[:2],
                               rtol=0, atol=1e-5)


def test_calls_from_several_threads_get_their_own_answers(tiny_classifier, batch):
    model, _ = tiny_classifier
    runner = Runner(model, "eager", batch_buckets=(1, 2, 4), length_buckets=(16,), pad=True)  # shared static inputs
    expected = eager(model, batch)
    results, errors = {}, []

    def ask(i):
        try:
            for _ in range(5):
                row = i % 4
                results[i] = runner(batch["input_ids"][row:row + 1], batch["attention_mask"][row:row + 1])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, got in results.items():
        torch.testing.assert_close(got[0], expected[i % 4], rtol=0, atol=1e-5)


def test_runner_refuses_what_it_cannot_run(tiny_classifier):
    model, _ = tiny_classifier
    with pytest.raises(ValueError, match="eval mode"):
        Runner(model.train())
    model.eval()
    with pytest.raises(ValueError, match="buckets must be positive"):
        Runner(model, "eager", batch_buckets=(0, 2))
    with pytest.raises(ValueError, match="pads every call"):
        Runner(model, "compile", pad=False)
    with pytest.raises(ValueError, match=r"must both be \(batch, seq\)"):
        Runner(model)(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            Runner(model, "graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["input", "prefix"])
def test_cuda_graphs_equal_eager(tiny_family, method, dtype):
    model, tokenizer, _ = tiny_family
    model = with_method(model, method).to("cuda", dtype)
    batch = {k: v.cuda() for k, v in encode(tokenizer, TEXTS, labels=[0] * len(TEXTS)).items()}
    expected = eager(model, batch).float()
    runner = Runner(model, "graph", batch_buckets=(2, 4, 8), length_buckets=(8, 16))
    got = runner(batch["input_ids"], batch["attention_mask"]).float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    again = runner(batch["input_ids"][:3], batch["attention_mask"][:3]).float()  # a replay of another bucket
    torch.testing.assert_close(again, expected[:3], rtol=tolerance, atol=tolerance)
