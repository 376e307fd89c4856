"""Fluency counts that BLEU and CIDEr hide: broken endings, stutters, and captions shared across images.

    counts = fluency_counts(["a dog runs on the grass", "a man is sitting on a red", "a red red car"])
    counts["bad_endings"], counts["repeats"], counts["distinct_per_image"]   # 1, 1, 1.0

- a bad ending: the caption's last word is a determiner, a preposition or a conjunction ("... with a",
  "... on the", "... and"), or an adjective used attributively with its noun missing ("... with a blue").
  An adjective after a copula or "in" is predicative and complete: "the dog is wet", "two dogs are black
  and white", "a girl dressed in pink".
- a repeat: the same word twice back to back ("is is", "red red").
- distinct captions / images: 1.0 when every image gets a caption of its own; lower when the model says
  the same sentence about many images.

The word lists are closed classes written out here (no tagger or NLTK data is needed), plus the colours
and the adjectives common in Flickr8k / COCO captions. Particles that often end a sentence as adverbs
("looks up", "lies down", "plays outside", "chase each other") are deliberately not listed.
`ends_badly` is the one rule; the decode-time guard (captioner.inference, end_guard) masks <end> by the
same rule, so what it prevents is exactly what is counted here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

DETERMINERS = frozenset("""a an the this these those his its their my your our some several many few
each every either neither both any no whose""".split())
PREPOSITIONS = frozenset("""of in on at with to from into onto for near through across under beneath
underneath toward towards between among amongst against during beside atop upon like without via amid
within throughout""".split())
CONJUNCTIONS = frozenset("and or but nor while as because if whilst although than".split())
COLOURS = frozenset("""red blue green yellow black white brown pink purple orange gray grey tan blond blonde
golden silver bright colorful colourful multicolored multicoloured striped""".split())
# Words that are as often nouns or adverbs at the end of a caption ("in the dark", "a street light", "jumps
# high", "on concrete", "a female") are left out.
ADJECTIVES = COLOURS | frozenset("""little small big large huge tiny young old older younger elderly tall
long short wet muddy grassy sandy snowy rocky wooden busy crowded empty shirtless smiling happy curly furry
fluffy dry deep shallow pretty beautiful dirty clear calm paved wooded shaggy spotted fancy cute""".split())
# After one of these a run of adjectives is a predicate ("is wet", "are black and white", "in pink").
PREDICATIVE = frozenset("""is are was were be being been looks look looking seems seem appears appear
gets get getting turns turn stays stay in""".split())
CLOSED_CLASS = DETERMINERS | PREPOSITIONS | CONJUNCTIONS


def words(caption: str | Sequence[str]) -> list[str]:
    """Lower-cased words of a caption (a string or a list of words), punctuation tokens dropped."""
    tokens = caption.lower().split() if isinstance(caption, str) else [w.lower() for w in caption]
    return [w for w in tokens if any(ch.isalnum() for ch in w)]


def predicative_flags(tokens: Sequence[str]) -> list[bool]:
    """flags[i]: word i sits in a run of adjectives (and "and") that follows a PREDICATIVE word, so an
    adjective there may end the sentence. The running state the decode-time guard keeps per beam."""
    flags, licensed = [], False
    for w in tokens:
        if w in PREDICATIVE:
            licensed = True
        elif w not in ADJECTIVES and w != "and":
            licensed = False
        flags.append(licensed)
    return flags


def bad_ending(caption: str | Sequence[str]) -> str | None:
    """The kind of word a broken caption ends on (determiner, preposition, conjunction, adjective), or None."""
    tokens = words(caption)
    if not tokens:
        return None
    last = tokens[-1]
    if last in DETERMINERS:
        return "determiner"
    if last in PREPOSITIONS:
        return "preposition"
    if last in CONJUNCTIONS:
        return "conjunction"
    if last in ADJECTIVES and not predicative_flags(tokens)[-1]:
        return "adjective"
    return None


def ends_badly(caption: str | Sequence[str]) -> bool:
    return bad_ending(caption) is not None


def repeated_word(caption: str | Sequence[str]) -> str | None:
    """The first word said twice back to back ("is is"), or None."""
    tokens = words(caption)
    return next((a for a, b in zip(tokens, tokens[1:]) if a == b), None)


def fluency_counts(captions: Iterable[str]) -> dict:
    """Counts over one caption per image: bad endings (total and by kind), repeats, distinct captions."""
    captions = [" ".join(words(c)) for c in captions]
    kinds = Counter(k for k in map(bad_ending, captions) if k is not None)
    n = len(captions)
    distinct = len(set(captions))
    return {
        "images": n,
        "bad_endings": sum(kinds.values()),
        "bad_endings_by_kind": {k: kinds[k] for k in ("determiner", "preposition", "conjunction", "adjective")},
        "repeats": sum(repeated_word(c) is not None for c in captions),
        "distinct": distinct,
        "distinct_per_image": distinct / n if n else 0.0,
    }


def format_fluency(counts: dict) -> str:
    """One line for the evaluate command's table."""
    n = counts["images"] or 1
    kinds = ", ".join(f"{k} {v}" for k, v in counts["bad_endings_by_kind"].items() if v)
    return (f"fluency: bad endings {counts['bad_endings']} ({100 * counts['bad_endings'] / n:.1f}%"
            f"{'; ' + kinds if kinds else ''}), repeated words {counts['repeats']} "
            f"({100 * counts['repeats'] / n:.1f}%), distinct captions / images "
            f"{counts['distinct']} / {counts['images']} = {counts['distinct_per_image']:.3f}")
