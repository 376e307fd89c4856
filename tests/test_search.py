"""Decoding: beam 1 == greedy, beam search == exhaustive search on tiny vocabularies, the length rules."""

import itertools
import math

import pytest
import torch

from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder
from captioner.errors import CaptionerError
from captioner.model.search import Hypothesis, SuppressWords, beam_search, draw, gnmt_length_penalty, greedy, sample

START, END = 1, 2
F = 16


def make(cell="lstm", conditioning="inject", V=40, layers=1, seed=0, end_bias=0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, conditioning=conditioning, embed_dim=16, hidden_dim=16,
                      num_layers=layers, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=V, feature_dim=F).eval()
    with torch.no_grad():
        # Untrained weights give near-uniform words: scale the output so choices are decisive, and make
        # <end> likely enough that captions end at varied lengths, as a trained model's do.
        model.out.weight.mul_(8.0)
        model.out.weight[END].mul_(0.375)  # <end>'s logit: mostly its bias, a little image and history
        model.out.bias[END] = end_bias
    return model


def sequence_log_prob(model, feats, words, ended):
    """Sum of log-probabilities of `words` (then <end> when ended) for one image, step by step."""
    with torch.no_grad():
        return _sequence_log_prob(model, feats, words, ended)


def _sequence_log_prob(model, feats, words, ended):
    state = model.init_state(feats[None])
    prev, total = START, 0.0
    for w in list(words) + ([END] if ended else []):
        lp, state = model.step(torch.tensor([prev]), state)
        total += lp[0, w].item()
        prev = w
    return total


@pytest.mark.parametrize("cell,conditioning,layers",
                         [("lstm", "inject", 1), ("gru", "both", 2), ("rnn", "init", 1), ("lstm", "both", 2)])
def test_beam_size_1_is_exactly_greedy(cell, conditioning, layers):
    lengths = set()
    for seed, end_bias in [(0, 0.5), (1, 1.5), (2, 2.5)]:
        model = make(cell, conditioning, layers=layers, seed=seed, end_bias=end_bias)
        feats = torch.randn(64, F)
        g = greedy(model, feats, max_len=12)
        b = beam_search(model, feats, beam_size=1, max_len=12)
        assert [h[0].tokens for h in b] == g
        lengths |= {len(c) for c in g}
    # The check covered captions that ended early and ones cut at max_len.
    assert 12 in lengths and min(lengths) < 12


def exhaustive_best(model, feats, V, max_len, min_len, alpha):
    """Best (score, words) over every caption up to max_len words, for one image: the search's definition."""
    words_ids = [w for w in range(V) if w != END]
    best = (-math.inf, None)
    for n in range(min_len, max_len + 1):
        for words in itertools.product(words_ids, repeat=n):
            ended = n < max_len  # a caption of max_len words is scored without <end>, as beam search does
            candidates = [ended] + ([False] if n == max_len else [])
            for e in candidates:
                lp = sequence_log_prob(model, feats, words, e)
                score = lp / gnmt_length_penalty(n + 1 if e else n, alpha)
                if score > best[0]:
                    best = (score, list(words))
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    # V=5 and 3 words: 4^3 live paths, so beam 64 never prunes anything and must find the optimum.
    V, max_len = 5, 3
    model = make("gru", V=V, seed=3, end_bias=2.0)
    with torch.no_grad():
        model.out.weight.div_(4.0)  # softer choices: the optimum is not simply the greedy path
    feats = torch.randn(6, F)
    hyps = beam_search(model, feats, beam_size=64, max_len=max_len, length_penalty=alpha)
    for i in range(6):
        score, words = exhaustive_best(model, feats[i], V, max_len, 1, alpha)
        assert hyps[i][0].tokens == words
        assert hyps[i][0].score == pytest.approx(score, abs=1e-4)


def test_scores_are_consistent_and_n_best_sorted():
    model = make("lstm", seed=4, end_bias=4.0)
    feats = torch.randn(10, F)
    alpha = 0.7
    results = beam_search(model, feats, beam_size=5, n_best=5, max_len=10, length_penalty=alpha)
    for i, hyps in enumerate(results):
        assert len(hyps) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5  # distinct captions
        for h in hyps:
            assert isinstance(h, Hypothesis) and END not in h.tokens and START not in h.tokens
            ended = len(h.tokens) < 10
            lp = sequence_log_prob(model, feats[i], h.tokens, ended)
            assert h.log_prob == pytest.approx(lp, abs=1e-4)
            n_terms = len(h.tokens) + (1 if ended else 0)
            assert h.score == pytest.approx(lp / gnmt_length_penalty(n_terms, alpha), abs=1e-4)


def test_batched_equals_one_image_at_a_time():
    model = make("gru", "both", layers=2, seed=5, end_bias=4.0)
    feats = torch.randn(12, F)
    batched = beam_search(model, feats, beam_size=4, n_best=2, max_len=15)
    single = [beam_search(model, feats[i:i + 1], beam_size=4, n_best=2, max_len=15)[0] for i in range(12)]
    for a, b in zip(batched, single):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def test_no_empty_caption_unless_allowed():
    # <end> is by far the likeliest first word: unmasked, every caption would be empty.
    model = make("lstm", seed=6, end_bias=30.0)
    feats = torch.randn(8, F)
    assert all(len(c) >= 1 for c in greedy(model, feats))
    assert all(len(h[0].tokens) >= 1 for h in beam_search(model, feats, beam_size=3))
    assert all(len(c) >= 1 for c in sample(model, feats, generator=torch.Generator().manual_seed(0)))
    empty = beam_search(model, feats, beam_size=3, allow_empty=True)
    assert all(h[0].tokens == [] for h in empty)


def test_min_len_and_max_len():
    model = make("lstm", seed=7, end_bias=30.0)  # would end right after the first word
    feats = torch.randn(8, F)
    hyps = beam_search(model, feats, beam_size=3, n_best=3, min_len=4, max_len=9)
    assert all(len(h.tokens) >= 4 for hs in hyps for h in hs)
    never_ends = make("lstm", seed=7, end_bias=-30.0)
    assert all(len(h[0].tokens) == 9 for h in beam_search(never_ends, feats, beam_size=3, max_len=9))
    assert all(len(c) == 9 for c in greedy(never_ends, feats, max_len=9))


class FixedModel:
    """A stand-in decoder whose next-word distribution never changes: word 3 with p=0.8, <end> 0.15."""

    V = 10

    def init_state(self, features):
        return (features[:, :1].clone(),)

    def step(self, tokens, state):
        probs = torch.full((tokens.shape[0], self.V), 0.05 / (self.V - 2))
        probs[:, 3], probs[:, END] = 0.8, 0.15
        return probs.log(), state

    select_state = staticmethod(CaptionDecoder.select_state)


def test_length_penalty_favours_longer_captions():
    # n words then <end>: log p = n log 0.8 + log 0.15 = -0.223 n - 1.897. The raw sum is best at the
    # shortest caption: one word, -2.12 (20 words cut at max_len, no <end> term: -4.46). With GNMT alpha=1
    # a word costs less than the penalty gains, so the longest wins: -4.46 / (25 / 6) = -1.07 beats
    # -2.12 / (7 / 6) = -1.82 for one word and -6.14 / (25 / 6) = -1.47 for 19 words and <end>.
    feats = torch.randn(3, F)
    plain = beam_search(FixedModel(), feats, beam_size=3, max_len=20)
    normalised = beam_search(FixedModel(), feats, beam_size=3, max_len=20, length_penalty=1.0)
    assert all(h[0].tokens == [3] for h in plain)
    assert all(h[0].tokens == [3] * 20 for h in normalised)
    assert normalised[0][0].log_prob == pytest.approx(20 * math.log(0.8), abs=1e-4)
    assert normalised[0][0].score == pytest.approx(20 * math.log(0.8) / (25 / 6), abs=1e-4)


def test_sampling_is_repeatable_and_top_1_is_greedy():
    model = make("lstm", seed=9, end_bias=3.0)
    feats = torch.randn(16, F)
    draw = lambda **kw: sample(model, feats, generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    assert draw(temperature=0.8) == draw(temperature=0.8)
    assert draw(top_k=1) == greedy(model, feats)
    with pytest.raises(CaptionerError):
        draw(temperature=0.0)


def test_draw_follows_the_probabilities_and_never_picks_an_impossible_word():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    picks = draw(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    freq = torch.bincount(picks[:, 0], minlength=4).float() / 20000
    assert freq.tolist() == pytest.approx([0.1, 0.0, 0.6, 0.3], abs=0.01)
    assert freq[1] == 0 and bool((picks[:, 1] == 3).all())


def test_bad_options_are_user_errors():
    model = make()
    feats = torch.randn(2, F)
    with pytest.raises(CaptionerError, match="n_best"):
        beam_search(model, feats, beam_size=2, n_best=3)
    with pytest.raises(CaptionerError, match="beam_size"):
        beam_search(model, feats, beam_size=0)
    with pytest.raises(CaptionerError, match="min_len"):
        beam_search(model, feats, min_len=30, max_len=20)


def test_suppressed_words_never_appear_and_other_captions_are_unchanged():
    torch.manual_seed(3)
    model = CaptionDecoder(ModelConfig(embed_dim=16, hidden_dim=16, dropout=0.0), 12, 8).eval()
    with torch.no_grad():
        model.out.bias[3] += 3.0  # make word 3 (<unk>) the favourite
    feats = torch.randn(20, 8)
    plain = [w for caption in greedy(model, feats) for w in caption]
    assert 3 in plain
    filtered = SuppressWords(model, [3])
    for caption in greedy(filtered, feats, max_len=10):
        assert 3 not in caption
    for hyps in beam_search(filtered, feats, beam_size=3, n_best=3, max_len=10):
        assert all(3 not in h.tokens for h in hyps)


def _every_row_every_step(model, feats, pick, max_len=20):
    """Greedy decoding and sampling the plain way: every row runs every step, ended or not."""
    state = model.init_state(feats)
    tokens = torch.full((feats.shape[0],), START)
    out, ended = [], torch.zeros(feats.shape[0], dtype=torch.bool)
    for t in range(max_len):
        lp, state = model.step(tokens, state)
        if t == 0:
            lp[:, END] = float("-inf")
        tokens = pick(lp)
        out.append(tokens)
        ended |= tokens == END
        if ended.all():
            break
    rows = torch.stack(out, 1).tolist()
    return [r[:r.index(END)] if END in r else r for r in rows]


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("gru", 2)])
def test_captions_that_ended_leave_the_batch_without_changing_any_caption(cell, layers):
    """greedy and sample drop ended captions from the decoder's batch; the captions, and for sampling the
    random draws, are those of running every row to the end."""
    model = make(cell, layers=layers, seed=4, end_bias=2.0)
    feats = torch.randn(40, F)
    with torch.no_grad():
        plain_greedy = _every_row_every_step(model, feats, lambda lp: lp.argmax(-1))
        gen = torch.Generator().manual_seed(3)
        plain_sampled = _every_row_every_step(model, feats, lambda lp: draw(torch.softmax(lp, -1), gen))
    assert len({len(c) for c in plain_sampled}) > 3  # ragged: rows really do leave at different steps
    assert greedy(model, feats) == plain_greedy
    assert sample(model, feats, generator=torch.Generator().manual_seed(3)) == plain_sampled
