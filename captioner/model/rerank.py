"""Consensus reranking of a beam's n-best, and each caption's confidence, from a NeighbourIndex.

    rerank = Rerank(n_best=8, weight=1.5, k=10, beam=10)  # the defaults; Rerank.off(): the beam's own order
    hyps = judge(index, consensus, confidence, features, hyps, words_of, rerank, tag_probs)

For each photo, its k nearest training images (cosine similarity of `v`) are found, and each candidate
of the beam's n-best is scored `lp + weight * consensus`, where lp is its log-probability per word (words
+ 1 terms, <end> included) and consensus its CIDEr-D against those images' captions
(captioner.model.consensus); the candidates are returned best first by that score, which becomes their
`score` (their `log_prob` stays the decoder's). Every candidate gets
its consensus, its confidence (when the index carries a calibration; captioner.model.confidence) and the
photo's neighbours. A calibration with a photo model also needs the photo's tag probabilities
(captioner.vision.tags.word_probabilities); without them the confidence is None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from captioner.model.confidence import Confidence, features_of, photo_features_of
from captioner.model.consensus import Consensus
from captioner.model.decoding import Rerank  # noqa: F401 (the settings, declared with the other decoding ones)
from captioner.model.neighbours import NeighbourIndex
from captioner.model.search import Hypothesis


def log_prob_per_word(h: Hypothesis) -> float:
    return h.log_prob / (len(h.tokens) + 1)


def judge(index: NeighbourIndex, consensus: Consensus, calibration: Confidence | None, features: torch.Tensor,
          hyps: Sequence[list[Hypothesis]], words_of: Callable[[Hypothesis], list[str]],
          rerank: Rerank, tag_probs: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """features (B, F) and each photo's candidates -> the candidates with consensus, confidence and
    neighbours filled in, reranked when rerank.n_best > 0 (else in the beam's order). tag_probs (B, W): the
    photos' tag word probabilities, for a calibration with a photo model."""
    sims, ids = index.search(features, rerank.k)
    if calibration is not None and calibration.photo is not None and tag_probs is None:
        calibration = None  # its photo model has nothing to judge the photo by
    familiar = None
    if calibration is not None and calibration.photo is not None:
        means = sims.double().mean(1).numpy()
        familiar = photo_features_of(sims[:, 0].double().numpy(), means, tag_probs.detach().cpu().double().numpy())
    out = []
    for i, candidates in enumerate(hyps):
        near = ids[i].tolist()
        close = sims[i].tolist()
        scores = consensus.scores([words_of(h) for h in candidates], near)
        nearest, mean = close[0], sum(close) / len(close)
        judged = []
        for h, knn in zip(candidates, scores.tolist()):
            conf = None
            if calibration is not None:
                photo = familiar[i] if familiar is not None else None
                conf = float(calibration(features_of(nearest, mean, knn, log_prob_per_word(h)), photo))
            judged.append(replace(h, consensus=knn, confidence=conf, neighbours=tuple(zip(near, close))))
        if rerank.n_best:  # ranked, and scored, by lp + weight * consensus
            judged = [replace(h, score=log_prob_per_word(h) + rerank.weight * h.consensus) for h in judged]
            judged.sort(key=lambda h: -h.score)
        out.append(judged)
    return out


class Judged:
    """A NeighbourIndex ready to judge captions: its consensus scorer (document frequencies built on first
    use) and its confidence's calibration, if it carries one (`needs_tags`: it has a photo model)."""

    def __init__(self, index: NeighbourIndex):
        self.index = index
        self.consensus = Consensus(index)
        self.calibration = Confidence.from_dict(index.calibration) if index.calibration else None

    @property
    def needs_tags(self) -> bool:
        return self.calibration is not None and self.calibration.photo is not None

    def __call__(self, features: torch.Tensor, hyps: Sequence[list[Hypothesis]],
                 words_of: Callable[[Hypothesis], list[str]], rerank: Rerank,
                 tag_probs: torch.Tensor | None = None) -> list[list[Hypothesis]]:
        return judge(self.index, self.consensus, self.calibration, features, hyps, words_of, rerank, tag_probs)

    def neighbour_captions(self, h: Hypothesis, n: int) -> list[dict]:
        """The first n of a hypothesis's neighbours: [{"image": name, "similarity": s, "captions": [...]}]."""
        return [{"image": self.index.names[i], "similarity": round(s, 4), "captions": self.index.captions(i)}
                for i, s in h.neighbours[:n]]
