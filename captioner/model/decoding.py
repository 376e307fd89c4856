"""How a caption is decoded, as one value: `Decoding` (beam size, length, n-best, length penalty, the fluency
guards, the consensus reranking, the open vocabulary of the encoder's tags). It imports no torch, so the command line builds and checks it before
anything heavy loads.

    decoding = Decoding()                                 # the defaults: the measured best
    decoding = Decoding(beam_size=5, guards=Guards.off()) # plain beam search, wider
    captioner.caption_features(features, decoding)        # travels whole: inference -> search

Every default lives here, and every rule is checked here once, when the value is made (`__post_init__`):
a Decoding that exists is valid. Where it is built:

- the command line: captioner.cli.add_decoding_options adds the options that `caption`, `evaluate` and
  `serve` share (their defaults read from `Decoding()`), and captioner.cli.decoding_of turns the parsed
  arguments into one (`Decoding.of(..., named=...)`), whose errors name the options (`--beam-size must be at least 1, got 0`);
- `captioner serve`'s form: the server's Decoding with the request's beam_size and n_best replaced;
- the Python API: `Captioner.__call__`'s keywords (and caption_features' and beam_search's) are its fields.

A new decoding setting is one more field here (with its default and its rule) and one more row of
captioner.cli.DECODING_OPTIONS (its option, the field it sets, its help): the option then appears in
`caption`, `evaluate` and `serve`, shows this default, and reaches the Decoding they build.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields

from captioner.errors import CaptionerError


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Guards:
    """Which constraints a caption is decoded under (captioner.model.constraints). The default is the
    measured best on the shipped model (docs/results.md, "Fluency"): no bigram twice, no word twice in a
    row, no dangling ending. `Guards.off()` is plain search."""

    no_repeat_ngram: int = 2  # NoRepeatNgram(n); 0: off
    repeat_word: bool = True  # NoRepeatWord
    end: bool = True  # EndGuard

    def __post_init__(self):
        if not _whole(self.no_repeat_ngram) or self.no_repeat_ngram < 0:
            raise CaptionerError(f"no-repeat n-gram size must be 0 (off) or positive, got {self.no_repeat_ngram!r}")

    @classmethod
    def off(cls) -> Guards:
        return cls(no_repeat_ngram=0, repeat_word=False, end=False)


@dataclass(frozen=True)
class Rerank:
    """Consensus reranking with the model's neighbour index (captioner.model.rerank). n_best: the beam's
    best candidates that are reranked (0: no reranking); beam: the beam width they come from (the search's
    beam is widened to it, and to n_best); weight: lambda in lp + lambda * consensus; k: the nearest
    training images consulted. The defaults are the best on Flickr8k dev (docs/results.md). `check()`
    refuses impossible settings; a Decoding holding one calls it."""

    n_best: int = 8
    weight: float = 1.5
    k: int = 10
    beam: int = 10

    @classmethod
    def off(cls) -> Rerank:
        return cls(n_best=0)

    def check(self) -> Rerank:
        if not _whole(self.n_best) or self.n_best < 0:
            raise CaptionerError(f"the reranked n-best must be 0 (off) or a positive integer, got {self.n_best!r}")
        if not _whole(self.k) or self.k < 1:
            raise CaptionerError(f"the neighbours consulted (k) must be a positive integer, got {self.k!r}")
        if not _whole(self.beam) or self.beam < 1:
            raise CaptionerError(f"the reranking beam must be a positive integer, got {self.beam!r}")
        if not self.weight >= 0:
            raise CaptionerError(f"the consensus weight must be 0 or positive, got {self.weight!r}")
        return self


@dataclass(frozen=True)
class OpenVocab:
    """Open-vocabulary decoding with the encoder's tags (captioner.model.open_vocab): copy, the share of the
    decoder's tag-word mass given to the photo's tags (0: off); must, a tag at least this probable must be
    said, by constrained search (0: off); margin, how much lower (log-probability per word) the caption
    that says it may score than the plain best and still replace it (0: no limit); floor, a checked word whose tag is below it is scaled down by
    tag / floor (0: off); checked, those words. enabled=False (`OpenVocab.off()`) decodes with the caption
    vocabulary alone, whatever the rest says. The defaults are measured in docs/results.md ("Open
    vocabulary")."""

    enabled: bool = True
    copy: float = 0.1
    must: float = 0.5
    margin: float = 0.3  # the required tag's caption is kept if its log-prob per word is at most this below the plain one's (0: always)
    floor: float = 0.5
    # The words checked: those whose tag is >= 0.05 on >= 80% of the Flickr8k training images that two or
    # more captions name them with (at least 30 such images): `benchmarks/open_vocab.py --recall`.
    checked: tuple[str, ...] = ("dog", "swing", "cliff")

    def __post_init__(self):
        for name, value, top in (("copy weight", self.copy, 1.0), ("constrained-search tag probability", self.must, 1.0),
                                 ("constrained-search margin", self.margin, 100.0),
                                 ("checked-word tag floor", self.floor, 0.999)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= top:
                raise CaptionerError(f"open-vocabulary {name} must be in [0, {top:g}] (0: off), got {value!r}")

    @classmethod
    def off(cls) -> OpenVocab:
        return cls(enabled=False)

    @property
    def on(self) -> bool:
        return self.enabled and (self.copy > 0 or self.must > 0 or self.floor > 0)


@dataclass(frozen=True)
class Decoding:
    """beam_size: the beam width (1: greedy); max_len: the longest caption, in words; n_best: captions
    kept per image, best first (at most the beam size); length_penalty: beam search's GNMT alpha (0: rank
    by the summed log-probability); guards: the decode-time fluency constraints; rerank: consensus
    reranking, where the model has a neighbour index.

    `named` (not stored) maps field names to the names the user gave them by (the command line's
    options), so that an error names what the user typed; by default it names the field."""

    beam_size: int = 3
    max_len: int = 20
    n_best: int = 1
    length_penalty: float = 0.0
    guards: Guards = field(default_factory=Guards)
    rerank: Rerank = field(default_factory=Rerank)
    open_vocab: OpenVocab = field(default_factory=OpenVocab)
    named: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, named: Mapping[str, str] | None):
        def name(key: str) -> str:
            return (named or {}).get(key, key)

        if not _whole(self.beam_size) or self.beam_size < 1:
            raise CaptionerError(f"{name('beam_size')} must be at least 1, got {self.beam_size!r}")
        if not _whole(self.max_len) or self.max_len < 1:
            raise CaptionerError(f"{name('max_len')} must be at least 1, got {self.max_len!r}")
        if not _whole(self.n_best) or not 1 <= self.n_best <= self.beam_size:
            raise CaptionerError(f"{name('n_best')} must be between 1 and the beam size ({self.beam_size}), got "
                                 f"{self.n_best!r} (the n-best are the best of the beam)")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not self.length_penalty >= 0:
            raise CaptionerError(f"{name('length_penalty')} must be 0 (off) or positive, got {self.length_penalty!r}")
        if not isinstance(self.guards, Guards) or not isinstance(self.rerank, Rerank):
            raise CaptionerError(f"guards must be a Guards and rerank a Rerank, got {self.guards!r} and "
                                 f"{self.rerank!r}")
        if not isinstance(self.open_vocab, OpenVocab):
            raise CaptionerError(f"open_vocab must be an OpenVocab, got {self.open_vocab!r}")
        self.rerank.check()

    @classmethod
    def of(cls, decoding: Decoding | None = None, named: Mapping[str, str] | None = None,
           **settings) -> Decoding:
        """`decoding` (default: the defaults) with the fields named in `settings` replaced, checked (errors
        naming the fields as `named` says)."""
        base = decoding if decoding is not None else cls()
        if not settings:
            return base
        values = {f.name: getattr(base, f.name) for f in fields(cls)}
        unknown = sorted(set(settings) - set(values))
        if unknown:
            raise TypeError(f"unknown decoding setting(s): {', '.join(unknown)}")
        return cls(**{**values, **settings}, named=named)


DEFAULT = Decoding()  # the defaults, for signatures that take one setting alone (greedy's max_len)
