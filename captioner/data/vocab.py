"""Vocabulary: the tokenizer and the word <-> id mapping the decoder is trained on.

The tokenizer needs no downloaded data (no nltk punkt): a regular expression keeps runs of letters and
digits, with inner apostrophes and hyphens ("don't", "t-shirt") and decimal points ("1.5") inside a word,
and drops punctuation, as the PTB tokenizer used by the COCO evaluation drops it before scoring. So the
model never spends capacity on the final " ." that most Flickr captions carry.

The vocabulary is stored in every checkpoint (`to_dict`), since ids mean nothing without it.

Captions' vocabularies grow slowly with their size (Heaps' law): Flickr8k's 330,000 training words hold
about 7,500 distinct ones, COCO's 4.3 million about 25,000. `build` warns when the vocabulary is larger than
`HEAPS_FACTOR` x sqrt(the words read), a bound three times what those datasets reach, because such a
vocabulary comes from text that is not captions (ids, hashes, a pasted document), and makes the model and
its checkpoints that much larger.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from captioner.atomic import atomic_write_text
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3: padding is 0 so zero-filled tensors are padding

_FORMAT, _VERSION = "captioner-vocabulary", 1
HEAPS_FACTOR = 40  # most distinct words per sqrt(word read) before `build` warns (see the module docstring)

# [^\W_] is a letter or digit in any script ("café" stays whole). Numbers may carry decimal or thousands
# separators; words may carry inner apostrophes and hyphens but not leading or trailing ones, which are
# quotes and dashes.
_WORD = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['-][^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of a caption, punctuation dropped:
    'A dog\'s T-shirt, "2.5" stars!' -> ["a", "dog's", "t-shirt", "2.5", "stars"]."""
    return _WORD.findall(text.lower().translate(_APOSTROPHES))


class Vocabulary:
    """Words by id. Ids 0-3 are <pad>, <start>, <end>, <unk>; then words by count, most frequent first."""

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3
    # Words no generated caption may contain: a caption saying "a man in a <unk>" helps nobody (papers'
    # captioners suppress it the same way), and <pad> / <start> are never words. Greedy, beam search,
    # sampling, SCST and dev evaluation all decode through captioner.model.search.captioning_policy,
    # which applies this rule.
    never_emitted = (unk_id, pad_id, start_id)

    def __init__(self, words: Iterable[str]):
        self.words: tuple[str, ...] = tuple(words)  # id -> word
        self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}  # word -> id
        _check(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times in `captions`; rarer ones will encode as <unk>.

        The order (count descending, then alphabetical) depends only on the captions, not on their order,
        so the same data always gives the same ids.
        """
        if min_count < 1:
            raise CaptionerError(f"min_count must be at least 1, got {min_count}")
        captions = list(captions)  # references to the strings: read twice when a warning names one
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = [w for w, n in counts.items() if n >= min_count and w not in SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))
        _warn_if_too_large(len(kept), captions, counts)
        return cls(SPECIALS + tuple(kept))

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __hash__(self) -> int:
        return hash(self.words)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def index(self, word: str) -> int:
        """The id of `word`, or of <unk> when it is not in the vocabulary."""
        return self.ids.get(word, self.unk_id)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """[<start>, word ids..., <end>]; `max_len` caps the word ids (the caption is cut before <end>, so
        every encoded caption still ends, and the decoder learns to stop)."""
        tokens = tokenize(text)
        if max_len is not None:
            if max_len < 0:
                raise CaptionerError(f"max_len must be >= 0, got {max_len}")
            tokens = tokens[:max_len]
        return [self.start_id, *(self.index(t) for t in tokens), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of `ids` joined by spaces, up to the first <end>; <start> and <pad> are skipped.
        Accepts any iterable of integers, including a 1-D tensor."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.words[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "words": list(self.words)}

    @classmethod
    def from_dict(cls, d: object) -> Vocabulary:
        """Inverse of `to_dict`; raises CaptionerError when `d` is not a vocabulary we wrote."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise CaptionerError(f"not a captioner vocabulary (expected a dict with format={_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise CaptionerError(f"vocabulary version {d.get('version')!r} not supported (expected {_VERSION})")
        words = d.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CaptionerError("vocabulary 'words' must be a list of strings")
        return cls(words)

    def save(self, path: Path | str) -> None:
        """Write as JSON through a temporary file and a rename, so a crash never leaves half a file."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: Path | str) -> Vocabulary:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CaptionerError(f"{path}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CaptionerError(f"{path}: not a vocabulary JSON file ({e})") from None
        try:
            return cls.from_dict(d)
        except CaptionerError as e:
            raise CaptionerError(f"{path}: {e}") from None


def _warn_if_too_large(size: int, captions: list[str], counts: Counter) -> None:
    """One warning when `size` words is more than captions of this many words have; names the caption
    richest in words seen nowhere else, the likeliest culprit."""
    read = sum(counts.values())
    bound = int(HEAPS_FACTOR * math.sqrt(read))
    if size <= bound:
        return
    culprit = max((tokenize(c) for c in captions), key=lambda tokens: sum(counts[t] == 1 for t in tokens))
    shown = " ".join(culprit[:8]) + (" ..." if len(culprit) > 8 else "")
    log.warning("vocabulary of %d words from %d words of captions: more than captions that size have (at most "
                "~%d); is some text not a caption? (most words of its own: %r)", size, read, bound, shown)


def _check(words: tuple[str, ...]) -> None:
    if words[: len(SPECIALS)] != SPECIALS:
        raise CaptionerError(f"vocabulary must start with {', '.join(SPECIALS)}, got {list(words[:4])}")
    if len(set(words)) != len(words):
        dup = next(w for w, n in Counter(words).items() if n > 1)
        raise CaptionerError(f"vocabulary lists {dup!r} twice")
    if not all(words):
        raise CaptionerError("vocabulary holds an empty word")
