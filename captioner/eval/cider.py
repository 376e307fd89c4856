"""CIDEr-D with document frequencies fixed once over a reference corpus: the reward for SCST.

pycocoevalcap's `Cider` (which is CIDEr-D: clipped tf-idf, Gaussian length penalty, x10) recomputes the
document frequencies from whatever references it is given, so scoring one training batch at a time would
weigh n-grams by how rare they are in that batch. Self-critical training (Rennie et al. 2017) instead fixes
them over the whole training set, as this class does; everything else follows pycocoevalcap's definition
exactly, and `tests/test_scst.py` checks that the two agree when the corpus is the scored set itself.

Captions come in as lists of words (already tokenized); an image's references are precomputed once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

N = 4  # n-grams 1..4
SIGMA = 6.0  # the length penalty's width, in words


def _ngrams(words: Sequence[str]) -> list[Counter]:
    return [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, N + 1)]


class CiderD:
    """Score candidate captions against the references of their images.

    references: image key -> list of tokenized references (lists of words). The document frequency of an
    n-gram is the number of images whose references contain it, over all images given here.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[Sequence[str]]]):
        if not references:
            raise ValueError("CiderD needs at least one image with references")
        df: Counter = Counter()
        counts = {}
        for key, refs in references.items():
            per_ref = [_ngrams(r) for r in refs]
            counts[key] = (per_ref, [len(r) for r in refs])
            df.update({g for ref in per_ref for table in ref for g in table})
        self._log_n = math.log(float(len(references)))
        self._df = df
        # Each image's references as tf-idf vectors (one dict per n), their norms and lengths.
        self._refs = {key: [(*self._vector(ref), length) for ref, length in zip(per_ref, lengths)]
                      for key, (per_ref, lengths) in counts.items()}

    def _vector(self, ngram_counts: list[Counter]) -> tuple[list[dict], list[float]]:
        vec, norms = [], []
        for table in ngram_counts:
            v = {g: tf * (self._log_n - math.log(max(1.0, self._df.get(g, 0.0)))) for g, tf in table.items()}
            vec.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vec, norms

    def score(self, key: Hashable, words: Sequence[str]) -> float:
        """CIDEr-D of one candidate (list of words) for image `key`, on pycocoevalcap's scale (x10)."""
        refs = self._refs[key]
        vec, norms = self._vector(_ngrams(words))
        total = 0.0
        for ref_vec, ref_norms, ref_len in refs:
            penalty = math.exp(-((len(words) - ref_len) ** 2) / (2 * SIGMA ** 2))
            for n in range(N):
                ref_n = ref_vec[n]
                val = sum(min(x, ref_n[g]) * ref_n[g] for g, x in vec[n].items() if g in ref_n)
                if norms[n] != 0 and ref_norms[n] != 0:
                    val /= norms[n] * ref_norms[n]
                total += val * penalty
        return total / N / len(refs) * 10.0

    def scores(self, keys: Sequence[Hashable], captions: Sequence[Sequence[str]]) -> list[float]:
        return [self.score(k, c) for k, c in zip(keys, captions)]
