"""Consensus with the nearest training images: CIDEr-D of candidate captions against their captions.

The score of a candidate is its CIDEr-D (as captioner.eval.cider defines it: clipped tf-idf of 1- to
4-grams, Gaussian length penalty, x10, document frequencies fixed over the whole training corpus) against
the captions of each of the k nearest training images, averaged over the k images (Devlin et al. 2015,
"Exploring nearest neighbor approaches for image captioning"). `tests/test_consensus.py` checks it
equals `CiderD` built over the index's captions.

It is computed in numpy, not word by word: every n-gram is one integer key (captioner.model.ngrams), the
corpus's document frequencies are one sorted key array with counts stored in the index, and a query's
candidates and references become small dense tf-idf matrices over the keys they use, so all
candidate-reference pairs are scored at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from captioner.errors import CaptionerError
from captioner.model.neighbours import NeighbourIndex
from captioner.model.ngrams import N, check_base, ngram_keys, order_of

SIGMA = 6.0  # the length penalty's width, in words


class Consensus:
    """CIDEr-D of candidates against the captions of training images of one NeighbourIndex."""

    def __init__(self, index: NeighbourIndex):
        self.index = index
        self.base = index.base
        try:
            check_base(self.base)
        except ValueError as err:
            raise CaptionerError(f"consensus scoring: {err}") from None
        self._log_n = math.log(float(max(1, len(index))))
        self._numpy: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _idf(self, keys: np.ndarray) -> np.ndarray:
        df_keys, df_counts = self.index.document_frequencies()
        df = np.zeros(keys.shape[0])
        if len(df_keys):
            at = np.searchsorted(df_keys, keys).clip(max=len(df_keys) - 1)
            df = np.where(df_keys[at] == keys, df_counts[at], 0)
        return self._log_n - np.log(np.maximum(1.0, df))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The index's tokens (int64), caption starts and image starts as numpy arrays (made once)."""
        if self._numpy is None:
            index = self.index
            self._numpy = (index.tokens.numpy().astype(np.int64), index.caption_starts.numpy(),
                           index.image_starts.numpy())
        return self._numpy

    def ids(self, words: Sequence[str]) -> np.ndarray:
        known = self.index.word_ids()
        return np.array([known.get(w, len(self.index.words)) for w in words], dtype=np.int64)

    def scores(self, candidates: Sequence[Sequence[str]], neighbours: Sequence[int]) -> np.ndarray:
        """(len(candidates),) each candidate's CIDEr-D against each neighbour image's captions, averaged over
        the images. Candidates are lists of words."""
        if not candidates or not len(neighbours):
            return np.zeros(len(candidates))
        tokens, caption_starts, image_starts = self._arrays()
        pieces, lengths, ref_image = [], [], []
        for j, i in enumerate(neighbours):  # an image's captions lie one after another in `tokens`
            first, last = image_starts[int(i)], image_starts[int(i) + 1]
            pieces.append(tokens[caption_starts[first]:caption_starts[last]])
            lengths.append(np.diff(caption_starts[first:last + 1]))
            ref_image.append(np.full(last - first, j))
        cand_ids = [self.ids(c) for c in candidates]
        lengths = np.concatenate([[len(c) for c in cand_ids], *lengths]).astype(np.int64)
        ref_image = np.concatenate(ref_image)
        n_refs = len(ref_image)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate([*cand_ids, *pieces]).astype(np.int64) + 1
        n_seqs = len(lengths)
        keys, owner = ngram_keys(flat, starts, self.base)
        uniq, column = np.unique(keys, return_inverse=True)
        tf = np.bincount(owner * len(uniq) + column, minlength=n_seqs * len(uniq)).reshape(n_seqs, len(uniq))
        weights = tf * self._idf(uniq)[None, :]  # (captions, keys) tf-idf
        orders = order_of(uniq, self.base)
        n_cand = len(candidates)
        cand, refs = weights[:n_cand], weights[n_cand:]
        length_gap = lengths[:n_cand, None] - lengths[None, n_cand:]
        penalty = np.exp(-(length_gap.astype(float) ** 2) / (2 * SIGMA ** 2))  # (cand, refs)
        total = np.zeros((n_cand, n_refs))
        for n in range(1, N + 1):
            cols = orders == n
            c, r = cand[:, cols], refs[:, cols]
            shared = (c > 0).any(0)  # only n-grams some candidate has can add to a dot product
            cs, rs = c[:, shared], r[:, shared]
            val = (np.minimum(cs[:, None, :], rs[None, :, :]) * rs[None, :, :]).sum(-1)
            norms = np.linalg.norm(c, axis=1)[:, None] * np.linalg.norm(r, axis=1)[None, :]
            val = np.where(norms > 0, val / np.where(norms > 0, norms, 1.0), val)
            total += val * penalty
        per_ref = total / N * 10.0  # (cand, refs): CIDEr-D against one reference
        per_image = np.stack([np.bincount(ref_image, weights=row, minlength=len(neighbours)) for row in per_ref])
        counts = np.bincount(ref_image, minlength=len(neighbours)).clip(min=1)
        return (per_image / counts[None, :]).mean(axis=1)
