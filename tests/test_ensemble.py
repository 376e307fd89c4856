"""Checkpoint ensembles: the mean of the members' probabilities, search over it, refusals, and the CLIs.

Small untrained decoders (their output layers scaled up so the distributions are far from uniform) stand
in for trained ones: what is checked is the arithmetic and the wiring, not caption quality.
"""

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.config import ModelConfig
from captioner.data.records import load_records
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder
from captioner.vision.encoders import LITE0_SPEC
from captioner.model.constraints import Guards
from captioner.model.ensemble import Ensemble
from captioner.errors import CaptionerError
from captioner.vision.features import extract_features
from captioner.inference import Captioner
from captioner.model.search import SuppressWords, beam_search, greedy
from tiny_data import COLOURS, make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
WORDS = ("<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "grass", "red", "square")
LSTM = ModelConfig(cell="lstm", embed_dim=8, hidden_dim=8, dropout=0.0)
GRU = ModelConfig(cell="gru", embed_dim=6, hidden_dim=12, num_layers=2, conditioning="both", dropout=0.0)
F = 6  # feature size of the small decoders
SPEC = {"name": "efficientnet_lite0", "weights": "test", "feature_dim": F}


def decoder(seed: int, cfg: ModelConfig = LSTM, vocab_size: int = len(WORDS), feature_dim: int = F):
    torch.manual_seed(seed)
    model = CaptionDecoder(cfg, vocab_size=vocab_size, feature_dim=feature_dim).eval()
    with torch.no_grad():
        model.out.weight.mul_(30.0)  # peaked distributions: captions end, beams disagree with greedy
    return model


def features(n: int = 5, dim: int = F) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(7))


def test_ensemble_of_one_is_the_member_exactly():
    member = decoder(0)
    ensemble = Ensemble([member])
    v = features()
    s_m, s_e = member.init_state(v), ensemble.init_state(v)
    tokens = torch.full((len(v),), 1)
    for word in (1, 4, 9, 5):
        lp_m, s_m = member.step(tokens, s_m)
        lp_e, s_e = ensemble.step(tokens, s_e)
        assert torch.equal(lp_m, lp_e)
        tokens = torch.full((len(v),), word)
    assert greedy(ensemble, v, max_len=8) == greedy(member, v, max_len=8)
    assert beam_search(ensemble, v, beam_size=3, n_best=3) == beam_search(member, v, beam_size=3, n_best=3)


def test_two_members_average_probabilities_not_log_probabilities():
    a, b = decoder(0), decoder(1, GRU)
    ensemble = Ensemble([a, b])
    v = features()
    s_a, s_b, s_e = a.init_state(v), b.init_state(v), ensemble.init_state(v)
    tokens = torch.full((len(v),), 1)
    for word in (4, 9, 10):
        lp_a, s_a = a.step(tokens, s_a)
        lp_b, s_b = b.step(tokens, s_b)
        lp_e, s_e = ensemble.step(tokens, s_e)
        by_hand = torch.log((lp_a.double().exp() + lp_b.double().exp()) / 2)
        torch.testing.assert_close(lp_e.double(), by_hand, rtol=0, atol=1e-5)
        assert not torch.allclose(lp_e, (lp_a + lp_b) / 2, atol=1e-3)  # not the mean of log-probs
        torch.testing.assert_close(lp_e.exp().sum(-1), torch.ones(len(v)))
        tokens = torch.full((len(v),), word)


@torch.no_grad()
def test_beam_search_over_an_ensemble_scores_what_the_ensemble_says():
    ensemble = Ensemble([decoder(0), decoder(1, GRU), decoder(2)])
    v = features()
    max_len = 8
    results = beam_search(ensemble, v, beam_size=4, n_best=2, max_len=max_len)
    assert len(results) == len(v) and all(len(h) == 2 for h in results)
    assert [h[0].tokens for h in beam_search(ensemble, v, beam_size=1)] == greedy(ensemble, v)
    # Re-score each best caption word by word: beam search reordered every member's state correctly.
    for i, hyps in enumerate(results):
        tokens = hyps[0].tokens + ([2] if len(hyps[0].tokens) < max_len else [])  # + <end> when it ended
        state, prev, total = ensemble.init_state(v[i:i + 1]), torch.tensor([1]), 0.0
        for word in tokens:
            log_probs, state = ensemble.step(prev, state)
            total += float(log_probs[0, word])
            prev = torch.tensor([word])
        assert hyps[0].log_prob == pytest.approx(total, abs=1e-4)


def save(path: Path, model: CaptionDecoder, words=WORDS, spec=SPEC, **extra) -> Path:
    checkpoint.save(path, {**checkpoint.model_payload(model, Vocabulary(words), spec), **extra})
    return path


@pytest.mark.parametrize("other, expected", [
    (dict(words=WORDS[:-1] + ("circle",)), "their vocabularies differ (word 10 is 'square' vs 'circle')"),
    (dict(words=WORDS + ("circle",)), "their vocabularies differ (11 vs 12 words)"),
    (dict(spec={**SPEC, "interpolation": "bilinear"}),
     "different image features (interpolation: absent vs bilinear)"),
    (dict(spec={**SPEC, "feature_dim": 4}, feature_dim=4), "different image features (feature_dim: 6 vs 4"),
    (dict(encoder_state={"head.weight": torch.zeros(2)}), "carries fine-tuned encoder weights"),
])
def test_members_of_another_vocabulary_or_encoder_are_refused(tmp_path, other, expected):
    a = save(tmp_path / "a.pt", decoder(0))
    words = other.pop("words", WORDS)
    model = decoder(1, GRU, vocab_size=len(words), feature_dim=other.pop("feature_dim", F))
    b = save(tmp_path / "b.pt", model, words, **other)
    with pytest.raises(CaptionerError) as info:
        Captioner.from_checkpoints([a, b])
    message = str(info.value)
    assert expected in message and f"cannot ensemble {a} with {b}" in message and "\n" not in message


def test_one_checkpoint_is_the_plain_model_and_several_an_ensemble(tmp_path):
    a = save(tmp_path / "a.pt", decoder(0))
    b = save(tmp_path / "b.pt", decoder(1, GRU))
    assert isinstance(Captioner.from_checkpoints([a]).model, CaptionDecoder)  # exactly as before
    both = Captioner.from_checkpoints([a, b])
    assert isinstance(both.model, Ensemble) and len(both.model.members) == 2
    v = features()
    hyps = both.caption_features(v, beam_size=3, n_best=3, guards=Guards.off())  # plain beam search
    by_hand = Ensemble([checkpoint.load_model(a).model, checkpoint.load_model(b).model])
    suppressed = SuppressWords(by_hand, [0, 1, 3])  # <pad>, <start>, <unk>: never in a caption
    assert hyps == beam_search(suppressed, v, beam_size=3, n_best=3)
    assert all({0, 1, 3}.isdisjoint(h.tokens) for image in hyps for h in image)


# ---- the command-line entry points on the tiny dataset, with real EfficientNet-Lite0 features ----------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny colour dataset and two checkpoints of different architectures on Lite0 features."""
    root = tmp_path_factory.mktemp("ens")
    data = make_flickr_layout(root / "flickr")
    vocab = Vocabulary.build([c for r in load_records(data) for c in r.captions], min_count=1)
    spec = asdict(LITE0_SPEC)
    paths = []
    for name, seed, cfg in (("lstm.pt", 0, LSTM), ("gru.pt", 1, GRU)):
        model = decoder(seed, cfg, vocab_size=len(vocab), feature_dim=LITE0_SPEC.feature_dim)
        with torch.no_grad():
            model.out.weight.div_(10.0)  # 1280 inputs: less sharpening needed
        path = root / name
        checkpoint.save(path, checkpoint.model_payload(model, vocab, spec))
        paths.append(path)
    return data, paths


def run_cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_caption_and_evaluate_clis_take_several_checkpoints(tiny, tmp_path):
    data, (a, b) = tiny
    images = sorted((data / "Images").glob("*_0.jpg"))
    ensemble = Captioner.from_checkpoints([a, b])
    expected = {str(p): r for p, r in ensemble.caption_images(images, beam_size=2, n_best=2)}

    # fp32, as Captioner.from_checkpoints runs: `auto` would be bf16 on a CPU with native bf16.
    proc = run_cli("caption.py", *images, "--checkpoint", a, "--checkpoint", b, "--json", "--beam-size", 2,
                   "--n-best", 2, "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert [e["path"] for e in printed] == [str(p) for p in images]
    for entry in printed:
        want = expected[entry["path"]]
        assert entry["caption"] == want.caption
        assert [h["score"] for h in entry["n_best"]] == pytest.approx([h.score for h in want.hypotheses],
                                                                      abs=1e-3)

    cache, out = tmp_path / "cache", tmp_path / "eval.json"
    proc = run_cli("evaluate.py", "--checkpoint", a, "--checkpoint", b, "--data", data, "--split", "dev",
                   "--cache-dir", cache, "--json", out, "--no-meteor", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "BLEU-4" in proc.stdout and "CIDEr" in proc.stdout
    report = json.loads(out.read_text())
    assert report["checkpoint"] == [str(a), str(b)] and report["images"] == len(COLOURS)
    records = load_records(data, splits=["dev"])
    store = extract_features(ensemble.encoder, [r.image for r in records], cache, progress=False)
    hyps = ensemble.caption_features(store.get([r.image for r in records]), beam_size=3)
    assert {e["image"]: e["caption"] for e in report["per_image"]} == {
        str(r.image): ensemble.text(h[0]) for r, h in zip(records, hyps)}
    single = Captioner.from_checkpoint(a).caption_features(store.get([r.image for r in records]), beam_size=3)
    assert [h[0].log_prob for h in single] != [h[0].log_prob for h in hyps]  # the ensemble is not member a
