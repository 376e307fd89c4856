"""The chunked output layer and loss (captioner.model.output) against the plain (tokens x vocabulary) forms:
the same loss and gradients to 1e-5 in fp32, with label smoothing, the never-emit mask and padding, in
cross-entropy training (full and truncated BPTT), the dev loss and self-critical training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig
from captioner.data.dataset import Batch
from captioner.model.decoder import CaptionDecoder
from captioner.model.output import Targets, token_loss
from captioner.train import scst
from captioner.train.step import backward_batch
from captioner.precision import FP32

PAD = 0


def _close(a, b, tol=1e-5):
    return torch.allclose(a, b, rtol=tol, atol=tol)


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_token_loss_equals_cross_entropy(eps, chunk):
    torch.manual_seed(0)
    out = nn.Linear(16, 50)
    h = torch.randn(130, 16, requires_grad=True)
    y = torch.randint(0, 50, (130,))
    w = torch.rand(130)
    ref = (F.cross_entropy(out(h), y, label_smoothing=eps, reduction="none") * w).sum()
    want = torch.autograd.grad(ref, [h, out.weight, out.bias])
    got = token_loss(h, out, Targets(y, w, eps), chunk=chunk)
    have = torch.autograd.grad(got, [h, out.weight, out.bias])
    assert _close(got, ref)
    assert all(_close(a, b) for a, b in zip(have, want))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_never_emitted_words_get_no_probability(eps):
    torch.manual_seed(1)
    out = nn.Linear(8, 30)
    h = torch.randn(40, 8, requires_grad=True)
    suppressed = torch.tensor([0, 1, 3])
    allowed = torch.tensor([i for i in range(30) if i not in (0, 1, 3)])
    y = allowed[torch.randint(0, len(allowed), (40,))]
    # the reference: the log-softmax over the allowed words only, smoothing spread over them alone
    logits = out(h)
    ref = F.cross_entropy(logits[:, allowed], torch.searchsorted(allowed, y), label_smoothing=eps, reduction="sum")
    masked = logits.masked_fill(torch.isin(torch.arange(30), suppressed), float("-inf"))
    if eps == 0:  # and the form self-critical training used: -inf logits, log-softmax, gather
        plain = -torch.log_softmax(masked, -1).gather(1, y[:, None]).sum()
        assert _close(plain, ref)
    want = torch.autograd.grad(ref, [h, out.weight, out.bias])
    got = token_loss(h, out, Targets(y, 1.0, eps, suppressed), chunk=16)
    have = torch.autograd.grad(got, [h, out.weight, out.bias])
    assert _close(got, ref)
    assert all(_close(a, b) for a, b in zip(have, want))
    # a weight-0 row whose target is never emitted (infinite loss) adds nothing, and no nan
    y[0] = 1
    w = torch.ones(40)
    w[0] = 0
    assert torch.isfinite(token_loss(h, out, Targets(y, w, eps, suppressed)))


def test_no_grad_gives_the_same_loss():
    torch.manual_seed(2)
    out = nn.Linear(8, 20)
    h = torch.randn(33, 8)
    y = torch.randint(0, 20, (33,))
    with torch.no_grad():
        got = token_loss(h, out, Targets(y, 0.5, 0.1), chunk=5)
    assert not got.requires_grad
    assert _close(got, 0.5 * F.cross_entropy(out(h), y, label_smoothing=0.1, reduction="sum"))


def _model(cell="gru", tie=False):
    torch.manual_seed(3)
    return CaptionDecoder(ModelConfig(cell=cell, embed_dim=12, hidden_dim=12, dropout=0.0, tie_weights=tie),
                          vocab_size=40, feature_dim=10, pad_id=PAD)


def _batch():
    torch.manual_seed(4)
    lengths = torch.tensor([9, 5, 7, 2, 9, 4])
    T = int(lengths.max())
    targets = torch.randint(4, 40, (6, T))
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = PAD
    inputs = torch.cat([torch.full((6, 1), 1), targets[:, :-1]], 1)
    inputs[targets == PAD] = PAD
    return Batch(torch.randn(6, 10), inputs, targets)


def _plain_backward(model, batch, mask, tbptt):
    """The loss as it was computed before chunking: (tokens, V) logits, F.cross_entropy, per BPTT chunk."""
    T = batch.inputs.shape[1]
    k = tbptt if tbptt > 0 else T
    total, hidden = 0.0, None
    for start in range(0, T, k):
        cut = slice(start, start + k)
        h, hidden = model.run(batch.features, batch.inputs[:, cut], hidden)
        m = mask[:, cut]
        loss = F.cross_entropy(model.out(h[m]), batch.targets[:, cut][m], label_smoothing=0.1,
                               reduction="sum") / mask.sum()
        loss.backward()
        total += loss.detach()
        hidden = [tuple(t.detach() for t in x) if isinstance(x, tuple) else x.detach() for x in hidden]
    return total


@pytest.mark.parametrize("tbptt", [0, 3])
@pytest.mark.parametrize("cell,tie", [("gru", False), ("lstm", True)])
def test_training_step_equals_the_plain_loss(tbptt, cell, tie):
    batch = _batch()
    mask = batch.targets != PAD
    plain = _model(cell, tie)
    ref = _plain_backward(plain, batch, mask, tbptt)
    chunked = _model(cell, tie)
    got = backward_batch(chunked, batch, PAD, label_smoothing=0.1, tbptt=tbptt)
    assert _close(got, ref.detach())
    for (name, a), b in zip(chunked.named_parameters(), plain.parameters()):
        assert _close(a.grad, b.grad), name


def test_dev_loss_equals_the_plain_mean():
    from captioner.train.validate import dev_loss
    batch = _batch()
    model = _model()
    with torch.no_grad():
        ref = F.cross_entropy(model(batch.features, batch.inputs).reshape(-1, 40), batch.targets.reshape(-1),
                              ignore_index=PAD)
    assert dev_loss(model, [batch], torch.device("cpu"), PAD, FP32) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("end_weight", [1.0, 0.0, 2.5])
def test_self_critical_loss_equals_the_plain_policy_gradient(end_weight):
    batch = _batch()
    mask = batch.targets != PAD
    ids = batch.targets[mask]
    end_id = 2
    ids[::4] = end_id
    targets = batch.targets.clone()
    targets[mask] = ids
    suppressed = torch.tensor([0, 1, 3])
    advantage = torch.linspace(-1.0, 1.5, 6)
    token_adv = advantage[:, None].expand_as(mask)[mask]
    plain = _model()
    logits = plain(batch.features, batch.inputs, mask)
    logits[:, suppressed] = float("-inf")
    token_logp = torch.log_softmax(logits, -1).gather(1, ids[:, None]).squeeze(1)
    ref = scst.policy_loss(token_logp, token_adv, ids == end_id, end_weight)
    ref.backward()
    chunked = _model()
    weights = scst.policy_weights(token_adv, ids == end_id, end_weight)
    got = chunked(batch.features, batch.inputs, mask, Targets(ids, weights, suppressed=suppressed))
    got.backward()
    assert _close(got, ref)
    for (name, a), b in zip(chunked.named_parameters(), plain.parameters()):
        assert _close(a.grad, b.grad), name


def test_bf16_autocast_runs_the_gemms_in_bf16_and_stays_near_fp32():
    batch = _batch()
    mask = batch.targets != PAD
    ref = _model()
    want = ref(batch.features, batch.inputs, mask, Targets(batch.targets[mask], 1.0))
    want.backward()
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(batch.features, batch.inputs, mask, Targets(batch.targets[mask], 1.0))
    assert got.dtype == torch.float32  # the loss is fp32 whatever the GEMMs ran in
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    assert model.out.weight.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients
    cos = F.cosine_similarity(model.out.weight.grad.flatten(), ref.out.weight.grad.flatten(), dim=0)
    assert cos > 0.99
