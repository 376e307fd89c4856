"""Checkpoint ensembles at decode time: several decoders agree on every next word.

At each step the ensemble's next-word distribution is the mean of its M members' probabilities,

    p(w | words so far, v) = 1/M sum_m p_m(w | words so far, v),   log p = logsumexp_m log p_m - log M,

so greedy, beam search and sampling run on it unchanged through the interface captioner.search drives
(`init_state` / `step` / `select_state`); its state is the tuple of the members' states. Averaging
probabilities rather than log-probabilities means one member's near-zero probability does not veto a word
the others like.

Members may differ in architecture (cell, size, conditioning) but must read the same image vector v and
write from the same vocabulary: `ensemble_of` refuses checkpoints that do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from captioner.checkpoint import LoadedModel
from captioner.data.vocab import Vocabulary
from captioner.decoder import CaptionDecoder, State
from captioner.encoders import spec_with_defaults
from captioner.errors import CaptionerError


class Ensemble(nn.Module):
    """Several CaptionDecoders seen as one: same vocabulary, same image features, mean probabilities."""

    def __init__(self, members: Sequence[CaptionDecoder]):
        super().__init__()
        if not members:
            raise CaptionerError("an ensemble needs at least one model")
        shapes = sorted({(m.vocab_size, m.feature_dim) for m in members})
        if len(shapes) > 1:
            raise CaptionerError("ensemble members must share the vocabulary and the feature size; got "
                                 + ", ".join(f"{v} words on {f} features" for v, f in shapes))
        self.members = nn.ModuleList(members)
        self.vocab_size, self.feature_dim = members[0].vocab_size, members[0].feature_dim

    def init_state(self, features: torch.Tensor) -> tuple[State, ...]:
        return tuple(m.init_state(features) for m in self.members)

    def step(self, tokens: torch.Tensor, state: tuple[State, ...]) -> tuple[torch.Tensor, tuple[State, ...]]:
        """tokens (B,) -> log of the members' mean next-word probabilities (B, V), new states."""
        steps = [m.step(tokens, s) for m, s in zip(self.members, state)]
        log_probs = torch.stack([lp for lp, _ in steps])  # (M, B, V)
        mean = torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # (B, V)
        return mean, tuple(s for _, s in steps)

    def select_state(self, state: tuple[State, ...], index: torch.Tensor) -> tuple[State, ...]:
        return tuple(m.select_state(s, index) for m, s in zip(self.members, state))


def ensemble_of(loaded: Sequence[LoadedModel], paths: Sequence[str | Path]) -> LoadedModel:
    """Loaded checkpoints -> one LoadedModel whose model is their Ensemble.

    Refused with a one-line CaptionerError naming two of the checkpoints when they do not share the
    vocabulary, the encoder spec (image features), or fine-tuned encoder weights.
    """
    first, first_path = loaded[0], paths[0]
    for other, path in zip(loaded[1:], paths[1:]):
        refuse = f"cannot ensemble {first_path} with {path}"
        if other.vocab != first.vocab:
            raise CaptionerError(f"{refuse}: their vocabularies differ "
                                 f"({_vocab_difference(first.vocab, other.vocab)})")
        tuned = [p for p, m in ((first_path, first), (path, other))
                 if m.checkpoint.get("encoder_state") is not None]
        if len(tuned) == 1:
            untuned = path if tuned[0] == first_path else first_path
            raise CaptionerError(f"{refuse}: {tuned[0]} carries fine-tuned encoder weights and {untuned} "
                                 "does not, so they read different image vectors")
        a, b = spec_with_defaults(first.encoder), spec_with_defaults(other.encoder)  # older specs: defaults
        differs = [f"{k}: {a.get(k, 'absent')} vs {b.get(k, 'absent')}" for k in dict.fromkeys([*a, *b])
                   if a.get(k) != b.get(k)]
        if first.model.feature_dim != other.model.feature_dim:
            differs.append(f"feature_dim: {first.model.feature_dim} vs {other.model.feature_dim}")
        if differs:
            raise CaptionerError(f"{refuse}: they were trained on different image features "
                                 f"({'; '.join(differs)})")
    return LoadedModel(Ensemble([m.model for m in loaded]), first.vocab, first.encoder, first.checkpoint)


def _vocab_difference(a: Vocabulary, b: Vocabulary) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} words"
    i = next(i for i, (x, y) in enumerate(zip(a.words, b.words)) if x != y)
    return f"word {i} is {a.words[i]!r} vs {b.words[i]!r}"
