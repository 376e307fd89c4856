"""Decode-time constraints: n-gram repetition blocking (Hugging Face's no_repeat_ngram_size) and the
end guard, through greedy, beam search and sampling, on a toy Markov decoder that loves to repeat."""


import pytest
import torch

from captioner.errors import CaptionerError
from captioner.eval.fluency import ends_badly
from captioner.model.constraints import EndGuard, NoRepeatNgram, NoRepeatWord
from captioner.model.search import beam_search, greedy, sample

V, START, END = 12, 1, 2


class Markov:
    """log p(next | last word) from a fixed table; word 5 most likes to follow itself."""

    def __init__(self, seed=0, self_loop=4.0):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(V, V, generator=g)
        logits[:, 5] += 2.0
        logits[5, 5] += self_loop
        logits[:, START] = -1e9  # <start> is never produced
        logits[:, 0] = -1e9
        self.table = logits.log_softmax(-1)

    def init_state(self, features):
        return torch.zeros(features.shape[0])

    def step(self, tokens, state):
        return self.table[tokens].clone(), state

    def select_state(self, state, index):
        return state[index]


def ngrams(tokens, n):
    seq = [START, *tokens]
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def greedy_by_hand(model, n, max_len):
    """Greedy decoding with the Hugging Face rule written out plainly, one hypothesis."""
    seq = [START]
    for t in range(max_len):
        log_probs = model.table[seq[-1]].clone()
        if t == 0:
            log_probs[END] = float("-inf")
        if len(seq) >= n:
            prefix = tuple(seq[len(seq) - n + 1:])
            for gram in ngrams(seq[1:], n):
                if gram[:-1] == prefix:
                    log_probs[gram[-1]] = float("-inf")
        word = int(log_probs.argmax())
        if word == END:
            break
        seq.append(word)
    return seq[1:]


def test_the_toy_decoder_repeats_without_the_constraint():
    caption = greedy(Markov(), torch.zeros(1, 1), max_len=8, start_id=START, end_id=END)[0]
    assert caption[-3:] == [5, 5, 5]  # so the tests below can fail


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_the_rule_written_by_hand(n, seed):
    model = Markov(seed)
    ours = greedy(NoRepeatNgram(model, n), torch.zeros(1, 1), max_len=10, start_id=START, end_id=END)[0]
    assert ours == greedy_by_hand(model, n, 10)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_ngram_twice_in_beam_search_and_sampling(n):
    feats = torch.zeros(4, 1)
    for seed in range(3):
        model = NoRepeatNgram(Markov(seed), n)
        beams = beam_search(model, feats, beam_size=3, n_best=3, max_len=12, start_id=START, end_id=END)
        drawn = sample(model, feats, max_len=12, generator=torch.Generator().manual_seed(seed),
                       start_id=START, end_id=END)
        captions = [h.tokens for hyps in beams for h in hyps] + drawn
        assert all(len(c) > 0 for c in captions)
        for c in captions:
            grams = ngrams(c, n)
            assert len(grams) == len(set(grams)), (n, c)


def test_beam_search_without_the_constraint_does_repeat():
    for seed in range(3):
        hyps = beam_search(Markov(seed), torch.zeros(1, 1), beam_size=3, n_best=3, max_len=12,
                           start_id=START, end_id=END)[0]
        assert any(len(set(ngrams(h.tokens, 2))) < len(ngrams(h.tokens, 2)) for h in hyps)


def test_no_repeat_word_blocks_back_to_back_only():
    feats = torch.zeros(3, 1)
    two = NoRepeatNgram(Markov(0), 2)
    model = NoRepeatWord(Markov(0))
    # Bigram blocking alone lets one "5 5" through; the word rule lets none, yet 5 may come back later.
    assert any(5 in c and [5, 5] == c[c.index(5):c.index(5) + 2]
               for c in greedy(two, feats, max_len=12, start_id=START, end_id=END))
    captions = [h.tokens for hyps in beam_search(model, feats, beam_size=3, n_best=3, max_len=12, start_id=START,
                                                 end_id=END) for h in hyps]
    captions += sample(model, feats, max_len=12, generator=torch.Generator().manual_seed(0), start_id=START,
                       end_id=END)
    assert all(a != b for c in captions for a, b in zip(c, c[1:]))
    assert any(c.count(5) > 1 for c in captions)


def test_bad_sizes_are_refused():
    with pytest.raises(CaptionerError, match="n-gram size"):
        NoRepeatNgram(Markov(), 0)


WORDS = {3: "a", 4: "on", 5: "red", 6: "dog", 7: "is", 8: "wet", 9: "and", 10: "runs", 11: "the"}


class LovesBadEndings(Markov):
    """After a determiner, preposition, conjunction or adjective, <end> is the likeliest next word."""

    def __init__(self, seed):
        super().__init__(seed, self_loop=0.0)
        for w in (3, 4, 5, 8, 9, 11):
            self.table[w, END] += 3.0
        self.table = self.table.log_softmax(-1)


def guard(model):
    return EndGuard(model, END, closed_ids=[3, 4, 9, 11], adjective_ids=[5, 8], predicative_ids=[7], and_id=9)


def text(tokens):
    return [WORDS.get(t, "x") for t in tokens]


def test_end_guard_stops_bad_endings_and_allows_predicates():
    feats = torch.zeros(6, 1)
    unguarded, guarded, predicative_ends = 0, 0, 0
    for seed in range(6):
        model = LovesBadEndings(seed)
        for m, is_guarded in ((model, False), (guard(model), True)):
            beams = beam_search(m, feats, beam_size=3, n_best=3, max_len=15, start_id=START, end_id=END)
            drawn = sample(m, feats, max_len=15, generator=torch.Generator().manual_seed(seed),
                           start_id=START, end_id=END)
            for c in [h.tokens for hyps in beams for h in hyps] + drawn:
                words = text(c)
                ended = len(c) < 15
                if ended and ends_badly(words):
                    guarded += is_guarded
                    unguarded += not is_guarded
                if is_guarded and ended and words[-1] in ("wet", "red") and not ends_badly(words):
                    predicative_ends += 1  # "... is wet": the adjective after a copula may end it
    assert unguarded > 0 and guarded == 0
    assert predicative_ends > 0


def test_constraints_compose_and_follow_beam_reordering():
    model = guard(NoRepeatNgram(LovesBadEndings(3), 2))
    beams = beam_search(model, torch.zeros(3, 1), beam_size=4, n_best=4, max_len=15, start_id=START, end_id=END)
    for hyps in beams:
        for h in hyps:
            grams = ngrams(h.tokens, 2)
            assert len(grams) == len(set(grams))
            assert len(h.tokens) == 15 or not ends_badly(text(h.tokens))


def test_guards_default_to_the_measured_best_everywhere():
    """The command line, the Python API and `Guards()` agree: guards on unless turned off."""
    from captioner.cli import build_parser
    from captioner.commands import guards_of
    from captioner.inference import Captioner
    from captioner.model.constraints import Guards

    assert Guards() == Guards(no_repeat_ngram=2, repeat_word=True, end=True)
    for command in (["caption", "x.jpg"], ["evaluate", "--data", "d"]):
        assert guards_of(build_parser().parse_args(command)) == Guards()
        off = build_parser().parse_args([*command, "--no-repeat-ngram", "0", "--no-repeat-guard", "--no-end-guard"])
        assert guards_of(off) == Guards.off()
    cap = Captioner.from_pretrained()
    wrappers, m = [], cap.constrained(Guards())
    while m is not cap.searchable:
        wrappers.append(type(m).__name__)
        m = m.model
    assert wrappers == ["EndGuard", "NoRepeatWord", "NoRepeatNgram"]
    assert cap.constrained(Guards.off()) is cap.searchable
    with pytest.raises(CaptionerError, match="no-repeat n-gram size"):
        Guards(no_repeat_ngram=-1)
