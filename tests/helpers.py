"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path)."""


def as_dataset(batch):
    """A tokenized batch (padded tensors) as an unpadded Dataset, the form the training and attribution loops read."""
    from datasets import Dataset

    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids],
                              "label": batch["labels"].tolist()})


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
    return BertConfig(**{**settings, **overrides})


TEXTS = ["a gripping , beautifully made film", "dull and far too long", "it was fine", "the worst plot ever"]
WORDS = ("a an and the it was film plot ever worst dull far too long fine gripping beautifully made review : , . "
         "great wonderful moving sharp funny brilliant tender bold boring clumsy flat tedious awful lifeless stale")


def word_tokenizer():
    """A word-level tokenizer with bos / eos and no pad token, like many decoder tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def classifier_on(folder, num_labels: int = 3):
    """(PromptClassifier with a 4-vector prompt, tokenizer) on a local backbone folder, with a trained-looking
    head so that logits differ across classes."""
    import torch

    from skeleton.backbones import load_backbone
    from skeleton.model import AdapterConfig, PromptClassifier

    backbone, tokenizer = load_backbone(str(folder))
    model = PromptClassifier(backbone, AdapterConfig(num_labels=num_labels, prompt_length=4), seed=0)
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    return model.eval(), tokenizer


def encode(tokenizer, texts=TEXTS, labels=(0, 1, 2, 1)) -> dict:
    """A padded batch: input_ids, attention_mask (batch, seq) and labels (batch,)."""
    import torch

    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(labels)}


def mask_ffn(backbone, keep):
    """Zero the down-projection columns of removed neurons (in place): the test oracle for slicing."""
    import torch

    from skeleton.backbones import family_of

    with torch.no_grad():
        for block, index in zip(family_of(backbone).ffn_blocks(backbone), keep):
            dropped = torch.ones(block.down.in_features, dtype=torch.bool)
            dropped[index] = False
            block.down.weight[:, dropped] = 0.0
    return backbone


def mask_heads(backbone, heads):
    """Zero the output-projection columns of removed heads (in place): the test oracle for head slicing."""
    import torch

    from skeleton.backbones import family_of
    from skeleton.prune import head_columns

    blocks = family_of(backbone).attention_blocks(backbone)
    assert len(heads) == len(blocks) and all(len(h) for h in heads), "one non-empty index tensor per layer"
    with torch.no_grad():
        for block, index in zip(blocks, heads):
            dropped = torch.ones(block.out.in_features, dtype=torch.bool)
            dropped[head_columns(index, block.head_dim)] = False
            block.out.weight[:, dropped] = 0.0
    return backbone


def masked_and_sliced(model, keep):
    """Two copies of a classifier: one with the dropped FFN neurons' down-projection columns zeroed (the oracle),
    one with them cut out of the weights."""
    import copy

    from skeleton.prune import slice_ffn

    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    mask_ffn(masked.backbone, keep)
    slice_ffn(sliced.backbone, keep)
    return masked, sliced


def set_pooling(model, pooling: str) -> None:
    """Switch an existing classifier's pooling; "attention" gets a random (non-zero) query."""
    import torch

    model.config.pooling = pooling
    query = torch.randn(model.head.in_features, generator=torch.Generator().manual_seed(0))
    model.query = torch.nn.Parameter(query) if pooling == "attention" else None


def captum_grad_x_act(model, batch, layers):
    """captum's LayerGradientXActivation of log p(gold) on the inputs of `layers`, summed over text and prompt
    positions and averaged over examples: the oracle for our one-backward scores, (in_features,) per layer."""
    import torch
    from captum.attr import LayerGradientXActivation

    embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])

    def log_probs(inputs_embeds, attention_mask):
        return torch.log_softmax(model.head(model.features(inputs_embeds, attention_mask)), -1)

    captum = LayerGradientXActivation(log_probs, layers).attribute(
        embeds.detach(), target=batch["labels"], additional_forward_args=(mask,), attribute_to_layer_input=True)
    return [((layer.abs() * mask.unsqueeze(-1)).sum((0, 1)) / len(batch["labels"])).float() for layer in captum]


def tiny_llama_config(**overrides):
    """A tiny LLaMA (gated FFN, grouped-query attention, tied embeddings as in SmolLM2)."""
    from transformers import LlamaConfig

    settings = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return LlamaConfig(**{**settings, **overrides})


# Budgets small enough for a test; every key is a field of flows.config.SweepConfig (checked in sweep_args). The
# input prompt only: one full model per sweep (a prefix adds a second; test_flow's prompt-methods test runs it).
TINY_SWEEP = {"text_column": "review", "label_column": "sentiment", "rates": [0.5], "methods": ["grad_x_act", "random"],
              "prompt_methods": ["input"],
              "prompt_length": 4, "max_length": 24, "train_steps": 6, "retune_steps": 4, "attribution_examples": 16,
              "distill": 0.5, "benchmark_repeats": 5, "experiment": "test-sweep"}


def sweep_args(backbone, data_file, /, **overrides) -> dict:
    """Parameters of a tiny sweep over `data_file` (the reviews CSV) on `backbone`: SweepConfig's field names."""
    from dataclasses import fields

    from flows.config import SweepConfig

    args = {**TINY_SWEEP, "backbone": str(backbone), "data_file": str(data_file), **overrides}
    unknown = set(args) - {f.name for f in fields(SweepConfig)}
    if unknown:
        raise TypeError(f"not sweep parameters: {sorted(unknown)}")
    return args


def sweep_options(parameters: dict) -> list[str]:
    """`skeleton sweep`'s options for sweep parameters (sweep_args' dict)."""
    options = []
    for name, value in parameters.items():
        options += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return options


def run_fresh(code: str):
    """Run `code` in a fresh Python process (nothing imported, nothing registered); it prints a JSON value last,
    which is returned. A failing process fails the test with its stderr."""
    import json
    import subprocess
    import sys
    import textwrap

    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 0, f"the fresh process failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_skeleton(capsys, *argv, stdin: str = "") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `skeleton ARGV` in this process (flows.cli.main, what the console script
    calls), reading `stdin`; the environment defaults it sets are undone after."""
    import io
    import os
    import sys

    import pytest

    from flows.cli import main

    saved = dict(os.environ)
    try:
        with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit:
            patch.setattr(sys, "stdin", io.StringIO(stdin))
            main([str(arg) for arg in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = capsys.readouterr()
    return exit.value.code, out.out, out.err


def artifacts_of(state) -> dict[str, object]:
    """The Prefect artifacts of a flow run (its final State), read back through Prefect's API: type -> artifact
    (latest)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.type: a for a in found}
