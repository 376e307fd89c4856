"""Checkpoint ensembles at decode time: several decoders agree on every next word.

At each step the ensemble's next-word distribution is the mean of its M members' probabilities,

    p(w | words so far, v) = 1/M sum_m p_m(w | words so far, v),   log p = logsumexp_m log p_m - log M,

so greedy, beam search and sampling run on it unchanged through the interface captioner.model.search drives
(`init_state` / `step` / `select_state`); its state is the tuple of the members' states. Averaging
probabilities rather than log-probabilities means one member's near-zero probability does not veto a word
the others like.

Members may differ in architecture (cell, size, conditioning) but must read the same image vector v and
write from the same vocabulary: `captioner.checkpoint.load_ensemble` refuses checkpoints that do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from captioner.model.decoder import CaptionDecoder, State
from captioner.errors import CaptionerError


class Ensemble(nn.Module):
    """Several CaptionDecoders seen as one: same vocabulary, same image features, mean probabilities. A
    captioner.model.search.Searchable, as each member is."""

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
