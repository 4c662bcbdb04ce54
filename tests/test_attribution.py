import pytest
import torch

from helpers import as_dataset, captum_grad_x_act, set_pooling
from skeleton.attribution import METHODS, attribute, down_projections, gold_log_prob, integrated_gradients_at
from skeleton.model import POOLINGS


@pytest.mark.parametrize("pooling", POOLINGS)
def test_fast_grad_x_activation_equals_captum(tiny_family, pooling):
    """Every family and pooling: our one-backward scores equal captum's on the inputs of every down projection."""
    model, tokenizer, batch = tiny_family
    set_pooling(model, pooling)
    ours = attribute("grad_x_act", model, as_dataset(batch), tokenizer.pad_token_id, batch_size=4)
    for layer_ours, expected in zip(ours, captum_grad_x_act(model, batch, down_projections(model)), strict=True):
        assert layer_ours.shape == (64,)
        torch.testing.assert_close(layer_ours, expected, rtol=1e-4, atol=1e-7)
    assert all(s.max() > 0 for s in ours)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_changes_nothing(tiny_family, pooling):
    """Every family and pooling: right padding inside a batch gives each example the logits and the attribution
    scores it gets alone."""
    model, tokenizer, batch = tiny_family
    set_pooling(model, pooling)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    with torch.no_grad():
        together = model(ids, mask)
        alone = torch.cat([model(i[m.bool()][None], m[m.bool()][None]) for i, m in zip(ids, mask)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    data = as_dataset(batch)
    for a, b in zip(attribute("grad_x_act", model, data, tokenizer.pad_token_id, batch_size=4),
                    attribute("grad_x_act", model, data, tokenizer.pad_token_id, batch_size=1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["activation", "random", "integrated_gradients", "wanda", "skill"])
def test_other_methods_score_every_neuron(tiny_classifier, batch, minilm_tokenizer, method):
    model, _ = tiny_classifier
    scores = attribute(method, model, as_dataset(batch), minilm_tokenizer.pad_token_id, batch_size=4, n_steps=4)
    assert [s.shape for s in scores] == [(64,), (64,)]
    assert all(torch.isfinite(s).all() and (s >= 0).all() and s.max() > 0 for s in scores)


def _down_inputs(model, batch):
    """Every down projection's input for one batch, all positions (prompt included), and the position mask."""
    from skeleton.attribution import capture_inputs

    with torch.no_grad(), capture_inputs(down_projections(model)) as acts:
        embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
        model.features(embeds, mask)
    return list(acts), mask


def test_wanda_is_weight_norm_times_activation_norm(tiny_classifier, batch, minilm_tokenizer):
    model, _ = tiny_classifier
    ours = attribute("wanda", model, as_dataset(batch), minilm_tokenizer.pad_token_id, batch_size=2)
    acts, mask = _down_inputs(model, batch)
    for layer, (down, a) in enumerate(zip(down_projections(model), acts)):
        norm = (a[mask.bool()].pow(2).sum(0) / len(batch["labels"])).sqrt()
        expected = torch.stack([down.weight[:, j].abs().sum() * norm[j] for j in range(down.in_features)])
        torch.testing.assert_close(ours[layer], expected, rtol=1e-4, atol=1e-7)


def test_skill_is_balanced_accuracy_of_thresholded_activation(tiny_classifier, batch, minilm_tokenizer):
    model, _ = tiny_classifier
    ours = attribute("skill", model, as_dataset(batch), minilm_tokenizer.pad_token_id, batch_size=3)
    acts, mask = _down_inputs(model, batch)
    labels = batch["labels"].tolist()
    for layer, a in enumerate(acts):
        pooled = [a[i][mask[i].bool()].mean(0) for i in range(len(labels))]
        for j in range(0, a.shape[-1], 7):
            values = [p[j].item() for p in pooled]
            threshold = sum(values) / len(values)
            per_class = []
            for c in sorted(set(labels)):
                pos = [v > threshold for v, y in zip(values, labels) if y == c]
                neg = [v <= threshold for v, y in zip(values, labels) if y != c]
                b = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2
                per_class.append(max(b, 1 - b))
            assert ours[layer][j].item() == pytest.approx(sum(per_class) / len(per_class), abs=1e-6)
    assert all(((s >= 0.5) & (s <= 1.0)).all() for s in ours)


def test_integrated_gradients_completeness(tiny_classifier, batch):
    """IG attributions sum to f(input) - f(zero activation at that layer), per example."""
    model, _ = tiny_classifier
    layer = down_projections(model)[1]
    attr = integrated_gradients_at(model, 1, batch, n_steps=200)
    with torch.no_grad():
        embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"])
        full = gold_log_prob(model.head(model.features(embeds, mask)), batch["labels"])
        handle = layer.register_forward_pre_hook(lambda _m, args: (torch.zeros_like(args[0]),))
        zero = gold_log_prob(model.head(model.features(embeds, mask)), batch["labels"])
        handle.remove()
    torch.testing.assert_close(attr.sum((1, 2)), full - zero, rtol=0, atol=2e-3)
    assert (full - zero).abs().max() > 1e-2


def test_unknown_method_lists_known():
    with pytest.raises(KeyError, match="unknown selection method 'gradx'.*grad_x_act"):
        METHODS["gradx"]
