"""N-grams of tokenized captions as integer keys, and their document frequencies over a corpus.

Every n-gram (n = 1..4) of word ids is one uint64 key: the ids + 1 read as digits in base B (B above the
largest id + 1), so the four orders fall in disjoint ranges ([B^(n-1), B^n)) and equal n-grams get equal
keys. With that, counting and matching n-grams is sorting and searching arrays instead of hashing tuples.
"""

from __future__ import annotations

import numpy as np

N = 4  # n-grams 1..4, as captioner.eval.cider


def check_base(base: int) -> None:
    if base ** N >= 2 ** 64:
        raise ValueError(f"n-gram keys of {base - 2} distinct words do not fit 64 bits (at most 65,534 words)")


def ngram_keys(tokens: np.ndarray, starts: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1..4-gram keys of captions laid one after another in `tokens` (ids + 1, so never 0), caption c
    being tokens[starts[c]:starts[c + 1]] -> (keys uint64, the caption each key comes from)."""
    n_tok = tokens.shape[0]
    caption = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    keys, owners = [], []
    key = np.zeros(n_tok, dtype=np.uint64)
    for n in range(1, N + 1):
        if n_tok < n:
            break
        # the key of the n-gram at i: (the key of the (n-1)-gram at i) * base + token[i + n - 1]
        key = key[: n_tok - n + 1] * np.uint64(base) + tokens[n - 1:].astype(np.uint64)
        same = caption[: n_tok - n + 1] == caption[n - 1:]
        keys.append(key[same])
        owners.append(caption[: n_tok - n + 1][same])
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(owners)


def order_of(keys: np.ndarray, base: int) -> np.ndarray:
    """Each key's n (1..4)."""
    bounds = np.array([base ** n for n in range(1, N)], dtype=np.uint64)
    return np.searchsorted(bounds, keys, side="right") + 1


def document_frequencies(tokens: np.ndarray, caption_starts: np.ndarray, image_starts: np.ndarray,
                         base: int, least: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, counts): for every n-gram held by the captions of at least `least` images, how many
    images' captions hold it. CIDEr's idf is log(images / max(1, df)), so n-grams of one image need no
    entry: leaving them out (least = 2) gives the same weights from a third of the keys."""
    keys, caption = ngram_keys(tokens.astype(np.int64) + 1, caption_starts, base)
    image = np.searchsorted(image_starts, caption, side="right") - 1
    order = np.lexsort((image, keys))
    keys, image = keys[order], image[order]
    first = np.ones(keys.shape[0], dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]) | (image[1:] != image[:-1])  # one count per image
    uniq, counts = np.unique(keys[first], return_counts=True)
    keep = counts >= least
    return uniq[keep], counts[keep]
