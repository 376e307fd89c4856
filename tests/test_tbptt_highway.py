"""Truncated BPTT and highway layers."""

import pytest
import torch

from captioner.config import ModelConfig
from captioner.data.dataset import Batch
from captioner.model.decoder import CaptionDecoder, Highway
from captioner.train.step import backward_batch

V, F = 40, 8


def model_and_batch(cell="lstm", layers=1, T=12, seed=0, highway=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, embed_dim=16, hidden_dim=16, num_layers=layers, dropout=0.0, highway=highway)
    model = CaptionDecoder(cfg, vocab_size=V, feature_dim=F)
    inputs = torch.randint(4, V, (3, T))
    targets = torch.randint(4, V, (3, T))
    targets[0, -3:] = 0  # some padding
    return model, Batch(torch.randn(3, F), inputs, targets)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_tbptt_with_k_at_least_the_length_is_full_bptt(cell):
    model, batch = model_and_batch(cell)
    full = backward_batch(model, batch, pad_id=0, tbptt=0)
    g_full = grads(model)
    model.zero_grad()
    chunked = backward_batch(model, batch, pad_id=0, tbptt=12)
    torch.testing.assert_close(chunked, full)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, g_full[name], msg=name)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_tbptt_chunked_loss_value_equals_full_loss(cell):
    """The forward pass is the same computation: only gradients are truncated."""
    model, batch = model_and_batch(cell, layers=2)
    full = backward_batch(model, batch, pad_id=0, tbptt=0)
    model.zero_grad()
    chunked = backward_batch(model, batch, pad_id=0, tbptt=5)
    torch.testing.assert_close(chunked, full)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_no_gradient_reaches_inputs_more_than_k_steps_back(cell):
    """Loss only at step t = 11; inputs before t - K = 7 use word ids that appear nowhere else."""
    K, T, t = 4, 12, 11
    model, batch = model_and_batch(cell, T=T)
    inputs = torch.full((3, T), 30)
    inputs[:, : t - K] = torch.arange(4, 4 + t - K)  # ids 4..10 only in steps 0..6
    targets = torch.zeros(3, T, dtype=torch.long)
    targets[:, t] = 5  # a loss at step t alone
    batch = Batch(batch.features, inputs, targets)
    early = torch.arange(4, 4 + t - K)

    backward_batch(model, batch, pad_id=0, tbptt=K)
    assert model.embed.weight.grad[early].abs().max() == 0  # exactly zero: the graph was cut
    assert model.embed.weight.grad[30].abs().max() > 0  # recent inputs do get a gradient

    model.zero_grad()
    backward_batch(model, batch, pad_id=0, tbptt=0)  # full BPTT reaches all the way back
    assert model.embed.weight.grad[early].abs().max() > 0


def test_highway_starts_by_carrying_and_gates_are_learned():
    layer = Highway(6, transform_bias=-2.0)
    x, h = torch.randn(4, 6), torch.randn(4, 6)
    y = layer(x, h)
    t = torch.sigmoid(layer.transform(x))
    torch.testing.assert_close(y, t * h + (1 - t) * x)
    assert t.mean() < 0.2  # mostly carry at init
    uncoupled = Highway(6, coupled=False)
    c = torch.sigmoid(uncoupled.carry(x))
    torch.testing.assert_close(uncoupled(x, h), torch.sigmoid(uncoupled.transform(x)) * h + c * x)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_highway_stack_shapes_gradients_and_step_equivalence(cell):
    model, batch = model_and_batch(cell, layers=4, highway=True)
    assert model.highway is not None and len(model.highway) == 3
    backward_batch(model, batch, pad_id=0)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    full = torch.log_softmax(model(batch.features, batch.inputs), -1)
    state = model.init_state(batch.features)
    for t in range(batch.inputs.shape[1]):
        logp, state = model.step(batch.inputs[:, t], state)
        torch.testing.assert_close(logp, full[:, t], atol=1e-5, rtol=1e-5)
