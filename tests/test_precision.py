"""bf16 autocast: auto picks it only where the CPU has native bf16; decoding and training stay exact where
it matters (beam 1 == greedy, fp32 log-probabilities, fp32 master weights and optimizer state)."""


import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import cli
from captioner.config import ModelConfig, load_config
from captioner.data.dataset import Batch
from captioner.errors import CaptionerError
from captioner.model.decoder import CaptionDecoder
from captioner.model.search import beam_search, greedy, sample
from captioner.precision import AUTO_OVERRIDE_ENV, cpu_flags, native_bf16, resolve
from captioner.train.step import backward_batch, mixed_precision

NO_BF16 = frozenset({"fpu", "avx", "avx2", "avx512f", "avx512_vnni"})  # AVX-512 without its bf16 extension
BF16 = NO_BF16 | {"avx512_bf16"}
AMX = frozenset({"avx2", "amx_tile", "amx_bf16"})
V, F, END = 40, 16, 2


def bf16():
    return resolve("bf16", "cpu", flags=BF16)


def test_auto_picks_fp32_where_the_cpu_lacks_bf16():
    assert resolve("auto", "cpu", flags=NO_BF16).name == "fp32"
    assert resolve("auto", "cpu", flags=frozenset()).name == "fp32"  # flags unreadable: never guess bf16
    assert resolve("auto", "cpu", flags=BF16).name == "bf16"
    assert resolve("auto", "cpu", flags=AMX).name == "bf16"
    assert "no native bf16" in resolve("auto", "cpu", flags=NO_BF16).reason


def test_explicit_choices_and_bad_names():
    assert resolve("fp32", "cpu", flags=BF16).name == "fp32"
    emulated = resolve("bf16", "cpu", flags=NO_BF16)
    assert emulated.name == "bf16" and "slower" in emulated.reason  # allowed, and said to be slow
    assert "slower" not in resolve("bf16", "cpu", flags=BF16).reason
    with pytest.raises(CaptionerError, match="precision must be one of"):
        resolve("fp16", "cpu")
    with resolve("fp32", "cpu").autocast():
        assert not torch.is_autocast_enabled("cpu")
    with bf16().autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    flags = cpu_flags(info)
    assert "avx512_bf16" in flags and native_bf16(flags)[0]
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize("forced", ["bf16", "fp32"])
def test_the_test_hook_forces_what_auto_finds_on_the_cpu(monkeypatch, forced):
    monkeypatch.setenv(AUTO_OVERRIDE_ENV, forced)
    auto = resolve("auto", "cpu")
    assert auto.name == forced and AUTO_OVERRIDE_ENV in auto.reason and "slower" not in auto.reason
    assert resolve("auto", torch.device("cpu")).name == forced
    with mixed_precision(torch.device("cpu"))[0]():  # what training does with a device and no precision
        assert torch.is_autocast_enabled("cpu") == (forced == "bf16")
    # Only `auto` on the CPU, read from the machine: explicit names and faked flags are as without it.
    assert resolve("fp32", "cpu").name == "fp32" and resolve("bf16", "cpu").name == "bf16"
    assert resolve("auto", "cpu", flags=NO_BF16).name == "fp32"
    assert resolve("auto", "cpu", flags=BF16).name == "bf16"
    monkeypatch.setenv(AUTO_OVERRIDE_ENV, "fp16")
    with pytest.raises(CaptionerError, match=AUTO_OVERRIDE_ENV):
        resolve("auto", "cpu")
    assert resolve("fp32", "cpu").name == "fp32"  # a bad value stops only what would have read it
    monkeypatch.delenv(AUTO_OVERRIDE_ENV)
    assert resolve("auto", "cpu").name == ("bf16" if native_bf16()[0] else "fp32")  # the machine again


@pytest.mark.parametrize("forced", ["bf16", "fp32"])
def test_the_test_hook_reaches_subprocesses(tmp_path, forced):
    """Read at call time from the environment, so the commands the tests start see it too."""
    repo = Path(__file__).resolve().parents[1]
    code = "from captioner.precision import resolve, announce; announce(resolve('auto', 'cpu'))"
    env = {**os.environ, AUTO_OVERRIDE_ENV: forced, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); " + code],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"precision: {forced} on cpu (auto: forced to {forced} by {AUTO_OVERRIDE_ENV}" in done.stderr


def test_config_and_cli_take_the_precision():
    assert load_config(overrides=["train.precision=bf16"]).train.precision == "bf16"
    assert load_config().train.precision == "auto"
    with pytest.raises(CaptionerError, match="train.precision must be one of"):
        load_config(overrides=["train.precision=fp16"])
    parser = cli.build_parser()
    assert parser.parse_args(["caption", "x.jpg"]).precision == "auto"
    assert parser.parse_args(["evaluate", "--data", "d", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["caption", "x.jpg", "--precision", "fp16"])


def make(cell, conditioning="inject", layers=1, seed=0, end_bias=0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, conditioning=conditioning, embed_dim=16, hidden_dim=16, num_layers=layers,
                      dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=V, feature_dim=F).eval()
    with torch.no_grad():
        model.out.weight.mul_(8.0)  # decisive word choices, as in tests/test_search.py
        model.out.weight[END].mul_(0.375)
        model.out.bias[END] = end_bias
    return model


@pytest.mark.parametrize("cell,conditioning,layers", [("gru", "both", 1), ("lstm", "inject", 2), ("rnn", "init", 1)])
def test_beam_1_equals_greedy_in_bf16(cell, conditioning, layers):
    lengths = set()
    for seed, end_bias in [(0, 0.5), (1, 1.5), (2, 2.5)]:
        model = make(cell, conditioning, layers, seed=seed, end_bias=end_bias)
        feats = torch.randn(24, F)
        with bf16().autocast():
            g = greedy(model, feats, max_len=12)
            b = beam_search(model, feats, beam_size=1, max_len=12)
        assert [h[0].tokens for h in b] == g
        lengths |= {len(c) for c in g}
    assert 12 in lengths and min(lengths) < 12  # captions that ended and captions cut at max_len


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_step_by_step_matches_teacher_forcing_in_bf16(cell):
    model = make(cell, "both", layers=2)
    feats, tokens = torch.randn(3, F), torch.randint(3, V, (3, 6))
    exact = torch.log_softmax(model(feats, tokens), -1)
    with bf16().autocast():
        logits = model(feats, tokens)
        state = model.init_state(feats)
        steps = []
        for t in range(tokens.shape[1]):
            logp, state = model.step(tokens[:, t], state)
            assert logp.dtype == torch.float32  # log-probabilities (beam scores) are fp32
            steps.append(logp)
    assert logits.dtype == torch.bfloat16  # the GEMMs really ran in bf16
    full = torch.log_softmax(logits.float(), -1)
    steps = torch.stack(steps, 1)
    # bf16 keeps 8 bits of mantissa: both bf16 paths agree, and stay near the fp32 model, to that precision.
    torch.testing.assert_close(steps, full, atol=0.15, rtol=0.02)
    torch.testing.assert_close(steps, exact, atol=0.15, rtol=0.02)
    assert not torch.equal(steps, exact)


def test_sampling_probabilities_are_fp32_and_draws_repeat_in_bf16():
    model = make("gru")
    feats = torch.randn(6, F)
    with bf16().autocast():
        a = sample(model, feats, generator=torch.Generator().manual_seed(3), max_len=10)
        b = sample(model, feats, generator=torch.Generator().manual_seed(3), max_len=10)
    assert a == b


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_training_keeps_fp32_weights_gradients_and_optimizer_state(cell):
    model = make(cell).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = Batch(torch.randn(4, F), torch.randint(3, V, (4, 7)), torch.randint(3, V, (4, 7)))
    autocast, scaler = mixed_precision(bf16())
    assert not scaler.is_enabled()
    before = [p.detach().clone() for p in model.parameters()]
    loss = backward_batch(model, batch, pad_id=0, autocast=autocast, scaler=scaler)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_beam_candidates_break_ties_like_argmax():
    from captioner.model.search import top_first

    torch.manual_seed(0)
    for _ in range(100):
        values = torch.randint(0, 5, (4, 10)).float()  # many ties, as bf16 logits have
        k = int(torch.randint(1, 6, ()))
        top, idx = top_first(values, k)
        want_top, want_idx = values.sort(dim=1, descending=True, stable=True)
        assert torch.equal(top, want_top[:, :k]) and torch.equal(idx, want_idx[:, :k])
        assert torch.equal(top_first(values, 1)[1][:, 0], values.argmax(dim=1))


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_the_recurrence_runs_its_matrix_multiplies_in_bf16_under_autocast(cell):
    """nn.GRU / nn.RNN are not on autocast's CPU list, but on the CPU their kernels are built from linear
    and mm calls that autocast does lower: the profiler's recorded input dtypes show the per-step
    recurrent products (B, H) x (H, gates * H) in bf16."""
    from torch.profiler import profile

    from captioner.config import ModelConfig
    from captioner.model.decoder import CaptionDecoder

    B, H, gates = 3, 8, {"gru": 3, "rnn": 1}[cell]
    model = CaptionDecoder(ModelConfig(cell=cell, embed_dim=6, hidden_dim=H, dropout=0.0), 20, 5)
    with profile(record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, _ = model.run(torch.randn(B, 5), torch.randint(4, 20, (B, 4)))
    recurrent = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::linear")
                 and any(list(s) == [B, H] for s in e.input_shapes)
                 and any(list(s) in ([gates * H, H], [H, gates * H]) for s in e.input_shapes)]
    assert recurrent, "no recurrent product recorded"
    products = [e for e in recurrent if e.name != "aten::linear"]  # the kernels linear dispatches to
    assert products and all("c10::BFloat16" in e.input_dtypes for e in products)
