"""The RNN lessons (docs/rnn-lessons.md): embedding = one-hot matmul, gradient flow, interpretable cells."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.analysis import gradient_flow as gf
from captioner.analysis import interpret
from captioner.config import ModelConfig
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- 2. the embedding layer is the lookup form of W_xh ------------------------------------------------
def test_embedding_equals_one_hot_matmul_forward_and_gradient():
    torch.manual_seed(0)
    V, E = 50, 8
    emb = torch.nn.Embedding(V, E)
    W = emb.weight.detach().clone().requires_grad_(True)  # the same matrix, used as W_xh
    ids = torch.randint(V, (4, 7))
    ids[0, :3] = 5  # a repeated word: its row's gradient must sum over its occurrences
    upstream = torch.randn(4, 7, E)

    lookup = emb(ids)
    matmul = F.one_hot(ids, V).float() @ W  # (4, 7, V) @ (V, E)
    assert torch.equal(lookup, matmul)  # selecting a row is exact: one 1.0 times it, zeros elsewhere
    lookup.backward(upstream)
    matmul.backward(upstream)
    assert torch.allclose(emb.weight.grad, W.grad, atol=1e-6)
    unused = torch.ones(V, dtype=torch.bool)
    unused[ids.unique()] = False
    assert emb.weight.grad[unused].abs().sum() == 0  # rows of unseen words get no gradient


# ---- 4. gradient flow ----------------------------------------------------------------------------------
def flow(cell, sigma=None, linear=False, seed=0):
    model = gf.fresh_model(cell, hidden=32, seed=seed)
    if sigma is not None:
        gf.rescale_recurrence(model, sigma)
    scale = min(gf.linear_regime_scale(sigma, 30), 1e-6) if linear else 1.0
    return gf.decay_factor(gf.measure(model, cell, steps=30, input_scale=scale, seed=seed).h_norms[-1])


def test_rescale_sets_every_gate_blocks_spectral_norm():
    model = gf.rescale_recurrence(gf.fresh_model("lstm", hidden=32), 1.7)
    norms = gf.spectral_norms(model)[0]
    assert set(norms) == {"W_hh", "W_hi", "W_hf", "W_hg", "W_ho"}
    assert all(abs(v - 1.7) < 1e-4 for k, v in norms.items() if k != "W_hh")
    blocks = model.layers[0].weight_hh_l0.detach().split(32)
    assert abs(float(torch.linalg.svdvals(blocks[1])[0]) - 1.7) < 1e-4


def test_rnn_gradient_vanishes_with_spectral_norm_below_one():
    assert flow("rnn", sigma=0.9) < 0.9  # tanh' < 1 only adds to the shrinkage
    assert flow("rnn", sigma=0.9, linear=True) == pytest.approx(0.9, abs=1e-3)  # exactly sigma when linear


def test_rnn_gradient_explodes_with_spectral_norm_two_in_linear_regime():
    factor = flow("rnn", sigma=2.0, linear=True)
    assert factor > 1.5
    model = gf.rescale_recurrence(gf.fresh_model("rnn", hidden=32), 2.0)
    f = gf.measure(model, "rnn", steps=30, input_scale=gf.linear_regime_scale(2.0, 30))
    assert f.mean_dtanh > 0.99  # it stayed linear
    assert f.h_norms[-1][0] / f.h_norms[-1][-1] > 1e6


def test_lstm_gradient_decays_slower_than_rnn_at_same_spectral_norm():
    for seed in (0, 1):
        assert flow("lstm", sigma=0.9, seed=seed) > flow("rnn", sigma=0.9, seed=seed) + 0.02


def test_gradient_flow_reports_every_layer_of_a_stack():
    torch.manual_seed(0)
    cfg = ModelConfig(cell="gru", embed_dim=16, hidden_dim=16, num_layers=2, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=40, feature_dim=8)
    f = gf.measure(model, "gru x2", steps=6, batch=2)
    assert f.h_norms.shape == (2, 6) and (f.h_norms > 0).all()
    assert len(f.spectral) == 2


def test_gradient_flow_cli_writes_plot(tmp_path):
    out = tmp_path / "flow.png"
    proc = subprocess.run([sys.executable, "analyze.py", "gradient-flow", "--cells", "rnn", "--steps", "10",
                           "--hidden", "16", "--spectral-radius", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000 and "rnn (init) sigma=2 linear" in proc.stdout


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "analyze.py", "gradient-flow", "--checkpoint",
                           str(tmp_path / "missing.pt")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "analyze.py", "cells", "--checkpoint", str(tmp_path / "missing.pt"),
                           str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---- 5. interpretable cells ----------------------------------------------------------------------------
def test_rank_units_finds_a_planted_unit():
    g = torch.Generator().manual_seed(0)
    prop = torch.arange(200.0) % 10  # e.g. the position in the sentence
    acts = torch.randn(200, 64, generator=g)
    acts[:, 17] = -0.3 * prop + 0.5 * torch.randn(200, generator=g)  # anti-correlated counts too
    acts[:, 3] = 0.0  # a dead unit: r = 0, not NaN
    ranked = interpret.rank_units(acts, prop, top=2)
    assert ranked[0][0] == 17 and ranked[0][1] < -0.8
    assert abs(ranked[1][1]) < 0.4
    assert interpret.correlations(acts, prop)[3] == 0


def test_noun_phrase_heuristic():
    words = "a man in a red and white shirt rides the bike down two steps".split()
    tagged = [w for w, inside in zip(words, interpret.noun_phrases(words)) if inside]
    assert tagged == "a man a red and white shirt the bike two steps".split()


def tiny_trained_model():
    """A decoder taught in-test that word t of every caption is the word of position t: a planted counter."""
    torch.manual_seed(0)
    words = "a the red dog man runs on grass in".split()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + words)
    captions = ["a red dog runs on the grass", "the man in a red shirt", "a dog on the grass"]
    model = CaptionDecoder(ModelConfig(cell="lstm", embed_dim=16, hidden_dim=16, dropout=0.0), len(vocab), 8)
    feats = torch.randn(3, 8)
    ids = [vocab.encode(c) for c in captions]
    T = max(map(len, ids))
    batch = torch.tensor([x + [0] * (T - len(x)) for x in ids])
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        opt.zero_grad()
        logits = model(feats, batch[:, :-1])
        F.cross_entropy(logits.reshape(-1, len(vocab)), batch[:, 1:].reshape(-1), ignore_index=0).backward()
        opt.step()
    return model.eval(), vocab, feats


def test_analyse_writes_heatmap_and_html(tmp_path):
    model, vocab, feats = tiny_trained_model()
    report = interpret.analyse(model, vocab, feats, n_best=3, max_len=10)
    assert [" ".join(c.words) for c in report.shown][0] == "a red dog runs on the grass"
    assert report.corpus_words >= 15
    (unit, r), = report.best["position"][:1]
    assert abs(r) > 0.5  # some unit tracks the position in the sentence
    assert report.best["colour"]  # "red" occurs: ranked
    png = interpret.write_heatmap(report, tmp_path / "cells.png")
    page = interpret.write_html(report, tmp_path / "cells.html").read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert page.count("<span class='w'") >= len(report.shown[0].words) and "grass" in page


def test_gradient_flow_measures_the_highway_network_that_was_trained():
    """The measurement runs the decoder's own step, highway gates included: its last-step loss equals the
    teacher-forced one, and changing a highway gate changes the gradients it reports."""
    torch.manual_seed(0)
    cfg = ModelConfig(cell="gru", embed_dim=16, hidden_dim=16, num_layers=2, highway=True, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=30, feature_dim=8).eval()
    features = torch.randn(3, 8)
    inputs = torch.randint(4, 30, (3, 6))
    inputs[:, 0] = 1
    targets = torch.randint(4, 30, (3,))
    norms, _ = gf.gradient_norms(model, features, inputs, targets)
    assert norms.shape == (2, 6) and bool((norms > 0).all())

    with torch.no_grad():  # the loss the measurement backpropagates is the trained network's
        teacher = F.cross_entropy(model(features, inputs)[:, -1], targets, reduction="sum")
    step_loss = torch.tensor(0.0)
    state = model.init_state(features)
    for t in range(inputs.shape[1]):
        log_probs, state = model.step(inputs[:, t], state)
    step_loss = F.nll_loss(log_probs, targets, reduction="sum")
    torch.testing.assert_close(step_loss, teacher, rtol=1e-5, atol=1e-5)

    opened = gf.copy.deepcopy(model)
    with torch.no_grad():
        opened.highway[0].transform.bias.fill_(3.0)  # the gate now mostly transforms instead of carrying
    opened_norms, _ = gf.gradient_norms(opened, features, inputs, targets)
    assert not torch.allclose(norms, opened_norms, rtol=1e-3)
