"""Decode-time constraints: decoders seen through a filter, like SuppressWords, for any search.

Each wrapper keeps what it needs per row (the words so far, a flag) inside the search state, so greedy,
beam search and sampling use it unchanged: `init_state` starts it, `step` advances it with the word fed
in and masks the next-word log-probabilities, `select_state` reorders it with the beams.

    searchable = EndGuard(NoRepeatNgram(SuppressWords(model, [unk, pad, start]), 3), end_id, ...)

- NoRepeatNgram(n): no n-gram occurs twice in a caption, as Hugging Face generation's
  `no_repeat_ngram_size` defines it: after the words w_1..w_t (the <start> token counts as w_0), every
  word that would complete an n-gram already present is masked. n = 1 forbids any word twice; n = 2 stops
  "red red" and "is is"; n = 3 still lets "a man ... a man" through once.
- NoRepeatWord: no word twice in a row ("is is", "red red"). NoRepeatNgram(2) lets one such pair through
  (it blocks the second occurrence of the bigram, "red red red"), and NoRepeatNgram(1) would forbid every
  word twice anywhere ("a man ... a hat"); this is the narrow rule between them.
- EndGuard: <end> is masked right after a determiner, preposition or conjunction, and after an
  adjective not licensed as a predicate (see captioner.eval.fluency, whose rule this is): the caption has
  to say the noun it promised. The word classes come in as vocabulary ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from captioner.errors import CaptionerError
from captioner.model.decoding import Guards  # noqa: F401 (which of these wrappers a caption is decoded under)
from captioner.model.search import Searchable


class _Wrapper:
    """A Searchable seen through a filter: each wrapper is itself a Searchable (captioner.model.search)."""

    def __init__(self, model: Searchable):
        self.model = model

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim


class NoRepeatNgram(_Wrapper):
    """Never complete an n-gram the caption already holds (Hugging Face's no_repeat_ngram_size)."""

    def __init__(self, model: Searchable, n: int):
        if n < 1:
            raise CaptionerError(f"no-repeat n-gram size must be 0 (off) or positive, got {n}")
        super().__init__(model)
        self.n = n

    def init_state(self, features):
        B = features.shape[0]
        return self.model.init_state(features), torch.zeros(B, 0, dtype=torch.long, device=features.device)

    def step(self, tokens, state):
        inner, history = state
        history = torch.cat([history, tokens[:, None]], dim=1)  # (rows, t + 1): <start> and the words so far
        log_probs, inner = self.model.step(tokens, inner)
        n, length = self.n, history.shape[1]
        if length >= n:
            grams = history.unfold(1, n, 1)  # (rows, length - n + 1, n) every n-gram so far
            prefix = history[:, length - n + 1:]  # (rows, n - 1) the words the next one would follow
            hit = (grams[:, :, :n - 1] == prefix[:, None, :]).all(dim=-1)  # (rows, windows)
            rows, windows = hit.nonzero(as_tuple=True)
            log_probs[rows, grams[rows, windows, n - 1]] = float("-inf")
        return log_probs, (inner, history)

    def select_state(self, state, index):
        inner, history = state
        return self.model.select_state(inner, index), history[index]


class NoRepeatWord(_Wrapper):
    """Never the word just said again: the word fed in is masked for the next step."""

    def init_state(self, features):
        return self.model.init_state(features)

    def step(self, tokens, state):
        log_probs, state = self.model.step(tokens, state)
        log_probs.scatter_(1, tokens[:, None], float("-inf"))
        return log_probs, state

    def select_state(self, state, index):
        return self.model.select_state(state, index)


class EndGuard(_Wrapper):
    """Mask <end> after a word that cannot end a caption (the fluency module's bad-ending rule)."""

    def __init__(self, model: Searchable, end_id: int, closed_ids: Iterable[int], adjective_ids: Iterable[int],
                 predicative_ids: Iterable[int], and_id: int | None):
        super().__init__(model)
        self.end_id = end_id
        as_ids = lambda ids: torch.as_tensor(sorted(set(ids)), dtype=torch.long)  # noqa: E731
        self.closed, self.adjectives, self.predicative = (as_ids(closed_ids), as_ids(adjective_ids),
                                                          as_ids(predicative_ids))
        self.keeps_licence = as_ids([*self.adjectives.tolist(), *([] if and_id is None else [and_id])])

    def init_state(self, features):
        B = features.shape[0]
        return self.model.init_state(features), torch.zeros(B, dtype=torch.bool, device=features.device)

    def step(self, tokens, state):
        inner, licensed = state
        device = tokens.device
        # As fluency.predicative_flags: a PREDICATIVE word licenses the adjectives (and "and"s) after it.
        licensed = torch.isin(tokens, self.predicative.to(device)) | (
            licensed & torch.isin(tokens, self.keeps_licence.to(device)))
        log_probs, inner = self.model.step(tokens, inner)
        dangling = torch.isin(tokens, self.closed.to(device)) | (
            torch.isin(tokens, self.adjectives.to(device)) & ~licensed)
        log_probs[dangling, self.end_id] = float("-inf")
        return log_probs, (inner, licensed)

    def select_state(self, state, index):
        inner, licensed = state
        return self.model.select_state(inner, index), licensed[index]
