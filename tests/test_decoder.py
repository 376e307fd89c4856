"""The v-injected decoder: every cell and conditioning mode, shapes, gradients, step == forward, overfit."""

import itertools

import pytest
import torch

from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder

CASES = list(itertools.product(["rnn", "lstm", "gru"], ["inject", "init", "both"]))
V, F = 30, 16


def make(cell, conditioning, layers=2, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, conditioning=conditioning, embed_dim=12, hidden_dim=12,
                      num_layers=layers, dropout=0.0, **kw)
    return CaptionDecoder(cfg, vocab_size=V, feature_dim=F)


@pytest.mark.parametrize("cell,conditioning", CASES)
def test_shapes_no_nan_and_gradient_on_every_parameter(cell, conditioning):
    model = make(cell, conditioning)
    feats, tokens = torch.randn(3, F), torch.randint(1, V, (3, 7))
    logits = model(feats, tokens)
    assert logits.shape == (3, 7, V)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("cell,conditioning", CASES)
def test_step_by_step_equals_teacher_forced_forward(cell, conditioning):
    model = make(cell, conditioning).eval()
    feats, tokens = torch.randn(2, F), torch.randint(1, V, (2, 6))
    full = torch.log_softmax(model(feats, tokens), -1)
    state = model.init_state(feats)
    for t in range(tokens.shape[1]):
        logp, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logp, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_image_changes_every_step_when_injected(cell):
    """With injection, changing v changes the output at a late step even with init conditioning off."""
    model = make(cell, "inject", layers=1).eval()
    tokens = torch.randint(1, V, (1, 8))
    a = model(torch.randn(1, F), tokens)[0, -1]
    b = model(torch.randn(1, F), tokens)[0, -1]
    assert not torch.allclose(a, b)


def test_init_mode_has_no_injection_parameters():
    model = make("lstm", "init")
    assert model.image_in is None and model.image_init is not None
    model = make("lstm", "inject")
    assert model.image_in is not None and model.image_init is None


def test_select_state_reorders_rows():
    model = make("lstm", "both").eval()
    state = model.init_state(torch.randn(3, F))
    picked = model.select_state(state, torch.tensor([2, 2, 0]))
    for a, b in zip(picked, state):
        torch.testing.assert_close(a[0], b[2])
        torch.testing.assert_close(a[2], b[0])


def test_tied_weights_share_storage():
    model = make("gru", "inject", tie_weights=True)
    assert model.out.weight.data_ptr() == model.embed.weight.data_ptr()


@pytest.mark.parametrize("cell,conditioning", CASES)
def test_overfits_a_handful_of_captions(cell, conditioning):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, conditioning=conditioning, embed_dim=32, hidden_dim=48,
                      num_layers=1, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=V, feature_dim=F)
    feats = torch.randn(4, F)
    captions = torch.randint(4, V, (4, 8))
    captions[:, 0] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        logits = model(feats, captions[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), captions[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"{cell}/{conditioning} did not learn 4 captions: loss {loss.item():.3f}"


@pytest.mark.parametrize("cell,conditioning,layers,highway", [
    ("gru", "both", 1, False), ("lstm", "inject", 2, False), ("rnn", "init", 2, True), ("gru", "inject", 2, True)])
def test_ragged_lengths_run_packed_with_the_same_loss_and_gradients(cell, conditioning, layers, highway):
    """forward(..., lengths=) runs each row for its own steps only (self-critical training's ragged samples):
    the loss over the real tokens and every gradient equal the padded pass's."""
    from captioner.model.output import Targets

    model = make(cell, conditioning, layers=layers, highway=highway)
    feats, tokens = torch.randn(5, F), torch.randint(3, V, (5, 8))
    lengths = torch.tensor([8, 3, 5, 1, 6])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    tokens[~mask] = 0  # padding after each row's end, as sequence_tensors writes it
    targets = torch.randint(3, V, (5, 8))
    weights = torch.randn(int(mask.sum()))  # advantages: of both signs, as in the policy gradient
    grads = []
    for given in (None, lengths):
        model.zero_grad()
        loss = model(feats, tokens, mask, Targets(targets[mask], weights), lengths=given)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (packed, packed_grads) = grads
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # past a row's length the packed outputs are zeros, and the last states are each row's own last step
    h, last = model.run(feats, tokens, lengths=lengths)
    assert bool((h[~mask] == 0).all())
    for i, n in enumerate(lengths.tolist()):
        _, own = model.run(feats[i:i + 1], tokens[i:i + 1, :n])
        top = own[-1][0] if isinstance(own[-1], tuple) else own[-1]
        mine = last[-1][0] if isinstance(last[-1], tuple) else last[-1]
        torch.testing.assert_close(mine[i:i + 1], top, atol=1e-5, rtol=1e-5)


def test_the_cell_path_honours_lengths_as_the_packed_kernel_does():
    model = make("gru", "both", layers=1)
    feats, tokens = torch.randn(4, F), torch.randint(3, V, (4, 6))
    lengths = torch.tensor([6, 2, 4, 1])
    packed, packed_last = model.run(feats, tokens, lengths=lengths)
    x = model.embed(tokens) + model.image_inputs(feats)[0].unsqueeze(1)
    looped, looped_last = model.cell_loop(model.layers[0], x, model.initial_hidden(feats)[0], lengths)
    torch.testing.assert_close(looped, packed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(looped_last, packed_last[0], atol=1e-5, rtol=1e-5)
