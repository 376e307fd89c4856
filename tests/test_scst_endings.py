"""SCST's bad-ending options: <end> scored as a word, the <end> term's weight in the loss, and the
bad-ending / repeat penalties in the reward. Off by default (the reward and loss are then unchanged)."""

import numpy as np
import pytest
import torch

from captioner.config import ModelConfig, TrainConfig, load_config
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.errors import CaptionerError
from captioner.model.decoder import CaptionDecoder
from captioner.train import scst
from captioner.precision import FP32

WORDS = ["a", "red", "ball", "on", "the", "grass", "blue", "car", "in", "street", "green", "tree", "park",
         "white", "dog", "snow", "and"]
VOCAB = Vocabulary(SPECIALS + tuple(WORDS))
REFS = [["a red ball on the grass", "a red ball on grass", "the red ball on the grass"],
        ["a blue car in the street", "a blue car in a street", "the blue car in the street"],
        ["a green tree in the park", "a green tree in a park", "the green tree in the park"],
        ["a white dog on the snow", "a white dog in the snow", "the white dog on snow"]]


def ids(text):
    return [VOCAB.index(w) for w in text.split()]


def data():
    return scst.RewardData(list(range(4)), np.arange(4), REFS)


def test_defaults_score_plain_cider_d():
    d = data()
    caps = [ids("a red ball on the"), ids("a blue car in the street")]
    plain = scst.rewards(d, [0, 1], caps, VOCAB, TrainConfig())
    assert plain.tolist() == pytest.approx(d.cider.scores([0, 1], [c.split() for c in
                                                                    ["a red ball on the", "a blue car in the street"]]))


def test_end_as_a_word_costs_the_dangling_caption_more():
    d, cfg = data(), TrainConfig(scst_reward_end=True)
    complete, dangling = ids("a red ball on the grass"), ids("a red ball on the")
    plain = scst.rewards(d, [0, 0], [complete, dangling], VOCAB, TrainConfig())
    with_end = scst.rewards(d, [0, 0], [complete, dangling], VOCAB, cfg)
    # Plain CIDEr-D keeps most of the reward for stopping early; with <end> scored, "the <end>" matches
    # nothing while "grass <end>" does, so the dangling caption loses a larger share.
    assert with_end[1] / plain[1] < with_end[0] / plain[0] - 0.05
    assert with_end[0] > with_end[1]
    # A caption cut at max_len never said <end>: scored without it.
    cut = scst.rewards(d, [0], [complete], VOCAB, TrainConfig(scst_reward_end=True, eval_max_len=6))
    assert cut.item() == pytest.approx(d.cider_with_end().score(0, "a red ball on the grass".split()))


def test_penalties_are_subtracted_for_the_bad_captions_only():
    d = data()
    caps = [ids("a red ball on the grass"), ids("a red ball on the"), ids("a red red ball on the grass")]
    plain = scst.rewards(d, [0, 0, 0], caps, VOCAB, TrainConfig())
    both = scst.rewards(d, [0, 0, 0], caps, VOCAB, TrainConfig(scst_bad_ending_penalty=0.5, scst_repeat_penalty=0.25))
    assert (plain - both).tolist() == pytest.approx([0.0, 0.5, 0.25])


def test_end_weight_scales_only_the_end_terms():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0])
    is_end = torch.tensor([False, False, True, True])
    base = scst.policy_loss(logp, adv, is_end)
    assert base.item() == pytest.approx(-(adv * logp).sum().item() / 4)
    assert scst.policy_loss(logp, adv, is_end, 0.0).item() == pytest.approx(-(-1.0 - 2.0) / 4)
    assert scst.policy_loss(logp, adv, is_end, 2.0).item() == pytest.approx(-(-1 - 2 - 1.0 + 12.0) / 4)


def test_bad_values_are_refused():
    for key, value in [("scst_end_weight", "-1"), ("scst_bad_ending_penalty", "-0.1"),
                       ("scst_repeat_penalty", "inf")]:
        with pytest.raises(CaptionerError, match=f"train.{key}"):
            load_config(None, [f"train.{key}={value}"])


def _one_epoch(cfg):
    features = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig(embed_dim=16, hidden_dim=32, dropout=0.0), len(VOCAB), 16, VOCAB.pad_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.scst_lr)
    gen = torch.Generator().manual_seed(0)
    result = scst.scst_epoch(model, features, data(), VOCAB, optimizer, cfg, 0, torch.device("cpu"), gen,
                             precision=FP32, progress=False)
    return result, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("option", [dict(scst_reward_end=True), dict(scst_end_weight=0.0),
                                    dict(scst_bad_ending_penalty=1.0), dict(scst_repeat_penalty=1.0)],
                         ids=lambda o: next(iter(o)))
def test_each_option_changes_the_scst_update_on_tiny_data(option):
    # An untrained decoder samples plenty of dangling, stuttering captions; each option must change the
    # step it takes (same seed, same samples), and the defaults must reproduce the plain update.
    common = dict(scst_lr=0.5, scst_samples=8, scst_batch_size=4, eval_max_len=8)
    plain, plain_params = _one_epoch(TrainConfig(**common))
    again, again_params = _one_epoch(TrainConfig(**common))
    fixed, fixed_params = _one_epoch(TrainConfig(**common, **option))
    assert torch.equal(plain_params, again_params) and plain.loss == again.loss
    assert np.isfinite(fixed.loss) and fixed.step == 1
    assert not torch.allclose(plain_params, fixed_params)
