"""Dataset records: one image, its reference captions and its split, whatever format it came from.

Every reader (flickr.py, karpathy.py, coco.py, imagefolder.py) turns one on-disk layout into a list of `Record`s; the rest
of the package sees records only. `load_records` picks the reader, either the one named by `format` or the
one whose files are found under `root` (see `detect_format`), and filters and sorts what it returns.

Data problems follow one policy, so a user learns of each kind of problem once instead of per image:
a caption for an image that is not on disk, or a split file naming an image with no captions, is counted,
logged once as a warning on the "captioner" logger with the first few names, and skipped. With
`strict=True` the same report is raised as a CaptionerError instead.

Whatever the reader, `load_records` then looks at each caption once: one without words (blank, or only
punctuation or emoji: nothing for the decoder to learn) is dropped, and one longer than MAX_CAPTION_WORDS
words (a paragraph pasted into a caption column, a file's text by mistake) is cut to that length, each
kind counted in one warning, so a stray megabyte of text never becomes a hundred thousand vocabulary words.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from captioner.data.vocab import tokenize
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

SPLITS = ("train", "val", "test")  # canonical names, in the order records are sorted

# Names seen in the wild for each split. Karpathy's "restval" is the part of COCO val2014 that his split
# gives to training, so it is training data.
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "restval": "train",
    "val": "val", "dev": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}

# How many names a warning lists before "...": enough to find the culprit, short enough for one line.
_SHOWN = 3

# Longest caption kept whole, in words: real ones are far shorter (Flickr8k's longest has 38 words, COCO's
# about 50), and training reads only the first data.max_len words anyway.
MAX_CAPTION_WORDS = 100
# A letter or digit: where there is one, tokenize() finds a word (its words are runs of them).
_A_WORD = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class Record:
    image: Path  # absolute path of the image file
    captions: tuple[str, ...]  # raw reference captions, as in the dataset
    split: str  # "train" | "val" | "test"


@dataclass(frozen=True)
class Reader:
    """One dataset format: how to recognise it under a folder, and how to read it."""

    detect: Callable[[Path], bool]
    read: Callable[[Path, bool], list[Record]]
    looks_for: str  # what `detect` looks for, said in the error when nothing is found


# Filled by the reader modules through `register`; the package `captioner.data` imports them.
READERS: dict[str, Reader] = {}
# name -> reader function(root: Path, strict: bool) -> list[Record]
FORMATS: dict[str, Callable[[Path, bool], list[Record]]] = {}

# When several formats are present under one root, the first in this order wins. Karpathy's json comes
# before the official COCO annotations because it is the split papers report on (and it carries a test
# split, which the official annotations lack).
_DETECTION_ORDER = ("karpathy", "coco", "flickr", "kaggle", "imagefolder")


def register(name: str, detect: Callable[[Path], bool], looks_for: str):
    """Decorator for a reader function: makes it available as `format=name`."""

    def decorator(read: Callable[[Path, bool], list[Record]]):
        READERS[name] = Reader(detect=detect, read=read, looks_for=looks_for)
        FORMATS[name] = read
        return read

    return decorator


def normalize_split(name: str) -> str:
    """Map a split name as datasets spell it ("dev", "validation", "restval", ...) to train, val or test."""
    key = str(name).strip().lower()
    if key not in _SPLIT_ALIASES:
        known = ", ".join(sorted(_SPLIT_ALIASES))
        raise CaptionerError(f"unknown split {name!r} (expected one of {known})")
    return _SPLIT_ALIASES[key]


def hash_split(image_name: str, val_fraction: float = 0.125, test_fraction: float = 0.125) -> str:
    """Assign a split from the image name alone, for layouts that ship no split files.

    The default fractions are those of the standard Flickr8k split (1,000 val and 1,000 test out of 8,000).
    A cryptographic hash, not `hash()`, so the split is the same in every process and on every machine
    (Python salts `hash()` per process); the salt string keeps it independent of other uses of sha256.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise CaptionerError(
            f"split fractions must be >= 0 and sum below 1, got val={val_fraction}, test={test_fraction}"
        )
    digest = hashlib.sha256(f"captioner-split:{image_name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def report(source: Path | str, problem: str, names: Iterable[str], strict: bool,
           action: str = "skipped") -> None:
    """Report one kind of data problem once: a warning with the count and first names, or, if strict, raise.

    `problem` reads after the count: report(token_file, "captioned images not found in Images/", ["x.jpg"])
    logs ".../Flickr8k.token.txt: 1 captioned images not found in Images/ (first: x.jpg); skipped".
    """
    names = list(names)
    if not names:
        return
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    message = f"{source}: {len(names)} {problem} (first: {shown})"
    if strict:
        raise CaptionerError(message)
    log.warning("%s; %s", message, action)


def trim_caption(caption: str) -> tuple[str, bool]:
    """(the caption to keep, whether it was cut): "" when it has no words (see captioner.data.vocab.tokenize);
    cut at a space after its first MAX_CAPTION_WORDS words when longer; otherwise as it is."""
    if len(caption) < 2 * MAX_CAPTION_WORDS:  # words are separated, so fewer than MAX here: only look for one
        return (caption if _A_WORD.search(caption) else ""), False
    words = len(tokenize(caption))
    if words <= MAX_CAPTION_WORDS:
        return (caption if words else ""), False
    kept, words = [], 0
    for piece in caption.split():  # a word never spans a space, so the pieces' words add up to the caption's
        words += len(tokenize(piece))
        if words > MAX_CAPTION_WORDS:
            break
        kept.append(piece)
    return " ".join(kept), True


def keep_existing(images: Mapping[str, Path], source: Path | str, where: str, strict: bool) -> dict[str, Path]:
    """The entries of name -> image path whose file exists; the others are reported (see `report`)."""
    present, missing = {}, []
    for name, path in images.items():
        if path.is_file():
            present[name] = path
        else:
            missing.append(name)
    report(source, f"captioned images not found in {where}", missing, strict)
    return present


def read_lines(path: Path, strict: bool) -> list[str]:
    """The lines of a text file, tolerant of what real downloads contain.

    CRLF or LF endings, a byte-order mark, a last line without newline. Bytes that are not UTF-8 are
    replaced (U+FFFD) after one warning naming the file and the first bad line, since losing a character
    of one caption is better than refusing the dataset; `strict` makes it an error.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CaptionerError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        message = f"{path}: bytes that are not UTF-8, first at line {line}"
        if strict:
            raise CaptionerError(message) from None
        log.warning("%s; replaced with U+FFFD", message)
        text = raw.decode("utf-8-sig", errors="replace")
    # split("\n") rather than splitlines(): the latter also breaks on characters such as \x1c or U+2028
    # that can sit inside a caption.
    return [line.rstrip("\r") for line in text.split("\n")]


def sort_records(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (SPLITS.index(r.split), str(r.image)))


def _detected(root: Path) -> list[str]:
    return [name for name in _DETECTION_ORDER if name in READERS and READERS[name].detect(root)]


def _locate(root: Path, format: str) -> tuple[str, Path]:
    """Resolve (format, dataset folder). A root one level above the dataset is accepted when exactly one
    of its subfolders holds a dataset: people often point at the folder they unzipped into."""
    if not root.exists():
        raise CaptionerError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise CaptionerError(f"{root}: is a file; point at the dataset folder")
    if format != "auto":
        if format not in READERS:
            raise CaptionerError(f"unknown dataset format {format!r} (expected auto or one of {', '.join(READERS)})")
        if READERS[format].detect(root):
            return format, root
        below = [sub for sub in sorted(root.iterdir()) if sub.is_dir() and READERS[format].detect(sub)]
        if len(below) == 1:
            return format, below[0]
        # Let the reader say precisely which of its files is missing.
        return format, root

    found = _detected(root)
    if found:
        return found[0], root
    below = [(sub, _detected(sub)) for sub in sorted(root.iterdir()) if sub.is_dir()]
    below = [(sub, names[0]) for sub, names in below if names]
    if len(below) == 1:
        sub, name = below[0]
        return name, sub
    if len(below) > 1:
        listed = ", ".join(sub.name for sub, _ in below)
        raise CaptionerError(f"{root}: several datasets found ({listed}); point at one of them")
    looked = "; ".join(f"{name}: {READERS[name].looks_for}" for name in _DETECTION_ORDER if name in READERS)
    raise CaptionerError(f"{root}: no dataset found (expected one of {looked}; here or one folder below)")


def detect_format(root: Path | str) -> str:
    """The format of the dataset under `root` (or in the one subfolder of `root` that holds a dataset)."""
    return _locate(Path(root).expanduser().resolve(), "auto")[0]


def load_records(
    root: Path | str,
    format: str = "auto",
    strict: bool = False,
    splits: Iterable[str] | None = None,
) -> list[Record]:
    """Read the dataset under `root` into records sorted by split (train, val, test) then image path.

    `format` is "auto" (detected) or a name in FORMATS; `splits` keeps only those splits (any spelling
    `normalize_split` accepts).
    """
    wanted = None if splits is None else {normalize_split(s) for s in splits}
    name, folder = _locate(Path(root).expanduser().resolve(), format)
    records = _trim_captions(READERS[name].read(folder, strict), folder, strict)
    if wanted is not None:
        records = [r for r in records if r.split in wanted]
    return sort_records(records)


def _trim_captions(records: list[Record], folder: Path, strict: bool) -> list[Record]:
    """The records with captions without words dropped and overlong ones cut (see the module docstring)."""
    out, wordless, cut = [], [], []
    for record in records:
        captions = []
        for caption in record.captions:
            kept, was_cut = trim_caption(caption)
            if not kept:
                wordless.append(record.image.name)
                continue
            if was_cut:
                cut.append(record.image.name)
            captions.append(kept)
        if captions:
            out.append(record if tuple(captions) == record.captions else Record(record.image, tuple(captions),
                                                                                record.split))
    report(folder, "captions with no words (blank, or only punctuation or emoji)", wordless, strict)
    report(folder, f"captions longer than {MAX_CAPTION_WORDS} words", cut, strict,
           action=f"cut to {MAX_CAPTION_WORDS} words")
    return out
