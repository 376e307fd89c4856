"""Consensus with the nearest training images: CIDEr-D of candidate captions against their captions.

The score of a candidate is its CIDEr-D (as captioner.eval.cider defines it: clipped tf-idf of 1- to
4-grams, Gaussian length penalty, x10, document frequencies fixed over the whole training corpus) against
the captions of each of the k nearest training images, averaged over the k images (Devlin et al. 2015,
"Exploring nearest neighbor approaches for image captioning"). `tests/test_consensus.py` checks it
equals `CiderD` built over the index's captions.

It is computed in numpy, not word by word: every n-gram is one integer key (word ids + 1 in base B, so
the four orders fall in disjoint ranges), the corpus's document frequencies are one sorted key array with
counts (built once, on first use: ~0.2 s for Flickr8k's 30,000 captions), and a query's candidates and
references become small dense tf-idf matrices over the keys they use, so all candidate-reference pairs
are scored at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from captioner.errors import CaptionerError
from captioner.model.neighbours import NeighbourIndex

N = 4  # n-grams 1..4, as captioner.eval.cider
SIGMA = 6.0


def _keys(tokens: np.ndarray, starts: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1..4-gram keys of the captions in `tokens` (flat ids + 1) split at `starts` -> (keys, caption)."""
    n_tok = tokens.shape[0]
    caption = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    keys, owners = [], []
    key = np.zeros(n_tok, dtype=np.uint64)
    for n in range(1, N + 1):
        if n_tok < n:
            break
        # key of the n-gram starting at i: (key of the (n-1)-gram at i) * base + token[i + n - 1]
        key = key[: n_tok - n + 1] * np.uint64(base) + tokens[n - 1:].astype(np.uint64)
        same = caption[: n_tok - n + 1] == caption[n - 1:]
        keys.append(key[same])
        owners.append(caption[: n_tok - n + 1][same])
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(owners)


def _order(keys: np.ndarray, base: int) -> np.ndarray:
    """Each key's n (1..4): keys of order n lie in [base ** (n - 1), base ** n)."""
    bounds = np.array([base ** n for n in range(1, N)], dtype=np.uint64)
    return np.searchsorted(bounds, keys, side="right") + 1


class Consensus:
    """CIDEr-D of candidates against the captions of training images of one NeighbourIndex."""

    def __init__(self, index: NeighbourIndex):
        self.index = index
        self.base = len(index.words) + 2  # id + 1 for known words, len(words) + 1 for any other word
        if self.base ** N >= 2 ** 64:
            raise CaptionerError(f"a neighbour index of {len(index.words)} distinct words is more than consensus "
                                 "scoring handles (65,534)")
        self._df_keys: np.ndarray | None = None
        self._df_counts: np.ndarray | None = None
        self._log_n = math.log(float(max(1, len(index))))

    def _document_frequencies(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique n-gram keys of the corpus and the number of images whose captions hold each."""
        if self._df_keys is None:
            index = self.index
            keys, caption = _keys(index.tokens.numpy().astype(np.int64) + 1, index.caption_starts.numpy(), self.base)
            image = np.searchsorted(index.image_starts.numpy(), caption, side="right") - 1
            order = np.lexsort((image, keys))
            keys, image = keys[order], image[order]
            first = np.ones(keys.shape[0], dtype=bool)
            first[1:] = (keys[1:] != keys[:-1]) | (image[1:] != image[:-1])  # one count per image
            self._df_keys, self._df_counts = np.unique(keys[first], return_counts=True)
        return self._df_keys, self._df_counts

    def _idf(self, keys: np.ndarray) -> np.ndarray:
        df_keys, df_counts = self._document_frequencies()
        df = np.zeros(keys.shape[0])
        if len(df_keys):
            at = np.searchsorted(df_keys, keys).clip(max=len(df_keys) - 1)
            df = np.where(df_keys[at] == keys, df_counts[at], 0)
        return self._log_n - np.log(np.maximum(1.0, df))

    def ids(self, words: Sequence[str]) -> np.ndarray:
        known = self.index.word_ids()
        return np.array([known.get(w, len(self.index.words)) for w in words], dtype=np.int64)

    def scores(self, candidates: Sequence[Sequence[str]], neighbours: Sequence[int]) -> np.ndarray:
        """(len(candidates),) each candidate's CIDEr-D against each neighbour image's captions, averaged over
        the images. Candidates are lists of words."""
        if not candidates or not len(neighbours):
            return np.zeros(len(candidates))
        index = self.index
        ref_captions = [c for i in neighbours for c in index.caption_range(int(i))]
        ref_image = np.repeat(np.arange(len(neighbours)),
                              [len(index.caption_range(int(i))) for i in neighbours])
        seqs = [self.ids(c) for c in candidates] + [index.caption_tokens(c).astype(np.int64) for c in ref_captions]
        lengths = np.array([len(s) for s in seqs])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(seqs) + 1 if lengths.sum() else np.zeros(0, np.int64)
        keys, owner = _keys(flat, starts, self.base)
        uniq, column = np.unique(keys, return_inverse=True)
        tf = np.zeros((len(seqs), len(uniq)))
        np.add.at(tf, (owner, column), 1.0)
        weights = tf * self._idf(uniq)[None, :]  # (captions, keys) tf-idf
        orders = _order(uniq, self.base)
        n_cand = len(candidates)
        cand, refs = weights[:n_cand], weights[n_cand:]
        length_gap = lengths[:n_cand, None] - lengths[None, n_cand:]
        penalty = np.exp(-(length_gap.astype(float) ** 2) / (2 * SIGMA ** 2))  # (cand, refs)
        total = np.zeros((n_cand, len(ref_captions)))
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
        per_image = np.zeros((n_cand, len(neighbours)))
        np.add.at(per_image.T, ref_image, per_ref.T)
        counts = np.bincount(ref_image, minlength=len(neighbours)).clip(min=1)
        return (per_image / counts[None, :]).mean(axis=1)
