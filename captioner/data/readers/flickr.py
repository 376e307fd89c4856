"""Readers for Flickr8k and Flickr30k as they are distributed: the official text files and the Kaggle CSV.

Official layout (format "flickr"), with the token file either at the root or under `Flickr8k_text/`:

    Flicker8k_Dataset/*.jpg           (sic, as unzipped; also Flickr8k_Dataset/, Images/, flickr30k_images/)
    Flickr8k_text/Flickr8k.token.txt  NAME.jpg#K<TAB>caption; Flickr30k: results_20130124.token
    Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt   one image name per line

Kaggle layout (format "kaggle"): `Images/*.jpg` and `captions.txt`, a CSV with the header `image,caption`.

With split files, an image in none of them is not part of the dataset (Flickr8k has 91 such images) and is
left out quietly; without any split files (Flickr30k, Kaggle) splits come from `hash_split`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from captioner.data.records import Record, hash_split, keep_existing, log, read_lines, register, report
from captioner.errors import CaptionerError

_TEXT_DIRS = (".", "Flickr8k_text", "Flickr30k_text")
_TOKEN_FILES = ("Flickr8k.token.txt", "Flickr30k.token.txt", "results_20130124.token")
_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images", "flickr30k_images", "flickr30k-images")
# File-name endings of the official split files (Flickr_8k.trainImages.txt, ...), with the split they hold.
_SPLIT_FILES = (("train", "trainImages.txt"), ("val", "devImages.txt"), ("test", "testImages.txt"))
_KAGGLE_CSV = "captions.txt"
# Entries of the official token files that name no image: Flickr8k's has five captions for
# "2258277193_586949ec62.jpg.1", a name that no image file has and no split file lists.
KNOWN_BAD_ENTRIES = frozenset({"2258277193_586949ec62.jpg.1"})


def _find_image_dir(root: Path) -> Path:
    for name in _IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise CaptionerError(f"{root}: no image folder found (looked for {', '.join(_IMAGE_DIRS)})")


def _find_token_file(root: Path) -> Path | None:
    for folder in _TEXT_DIRS:
        for name in _TOKEN_FILES:
            if (root / folder / name).is_file():
                return (root / folder / name).resolve()
    return None


class _Captions:
    """Captions per image in file order. A line repeated verbatim (same image, same caption number, same
    text) is dropped and counted; the same text under two caption numbers is kept, because those are two
    annotators writing the same sentence (Flickr8k has 9 such pairs) and both are references."""

    def __init__(self) -> None:
        self.by_image: dict[str, list[str]] = {}
        self.seen: set[tuple[str, str, str]] = set()
        self.duplicated: list[str] = []

    def add(self, image: str, caption: str, number: str | None = None) -> None:
        if number is not None:
            if (image, number, caption) in self.seen:
                self.duplicated.append(image)
                return
            self.seen.add((image, number, caption))
        self.by_image.setdefault(image, []).append(caption)

    def finish(self, source: Path) -> dict[str, list[str]]:
        if not self.by_image:
            raise CaptionerError(f"{source}: no captions found (empty file?)")
        if self.duplicated:
            # Harmless once removed, so a warning even in strict mode.
            names = list(dict.fromkeys(self.duplicated))
            log.warning(
                "%s: %d duplicate lines ignored (first: %s)", source, len(self.duplicated), ", ".join(names[:3])
            )
        return self.by_image


def _parse_token_file(path: Path, strict: bool) -> dict[str, list[str]]:
    """NAME.jpg#K<TAB>caption lines -> {NAME.jpg: [captions]}."""
    captions, malformed = _Captions(), []
    for number, line in enumerate(read_lines(path, strict), start=1):
        line = line.strip()
        if not line:
            continue
        key, tab, caption = line.partition("\t")
        image, hash_mark, slot = key.strip().rpartition("#")
        caption = caption.strip()
        if not (tab and hash_mark and image and caption):
            malformed.append(f"line {number}")
            continue
        captions.add(image, caption, slot)
    report(path, "malformed lines, not NAME.jpg#K<TAB>caption", malformed, strict)
    return captions.finish(path)


def _split_files(text_dir: Path) -> list[tuple[str, Path]]:
    found = []
    for split, ending in _SPLIT_FILES:
        found += [(split, path) for path in sorted(text_dir.glob(f"*{ending}")) if path.is_file()]
    return found


def _detect_flickr(root: Path) -> bool:
    return _find_token_file(root) is not None


def _records(
    captions: dict[str, list[str]], image_dir: Path, split_of: dict[str, str] | None, source: Path, strict: bool
) -> list[Record]:
    """Records for the captioned images that exist on disk. With `split_of` None every image gets
    `hash_split`; otherwise images missing from `split_of` are left out."""
    # Checked over all captioned images, in or out of a split, so a caption naming no file is always
    # reported, except the known bad entries of the official files, which are named once as such.
    named = {name: image_dir / name for name in captions}
    for name in KNOWN_BAD_ENTRIES:
        if name in named and not named[name].is_file():
            del named[name]
            log.info("%s: skipped %s, a known bad entry of the official file (its captions name no image)",
                     source, name)
    images = keep_existing(named, source, f"{image_dir}/", strict)
    records = []
    for name, path in images.items():
        split = hash_split(name) if split_of is None else split_of.get(name)
        if split is not None:
            records.append(Record(image=path, captions=tuple(captions[name]), split=split))
    return records


@register(
    "flickr",
    detect=_detect_flickr,
    looks_for=f"{' or '.join(_TOKEN_FILES)} here or in Flickr8k_text/",
)
def read_flickr(root: Path, strict: bool = False) -> list[Record]:
    """Flickr8k or Flickr30k in the official layout, or the flat one (every file in one folder)."""
    root = root.resolve()
    token_file = _find_token_file(root)
    if token_file is None:
        looked = ", ".join(_TOKEN_FILES)
        raise CaptionerError(f"{root}: no Flickr token file (looked for {looked} here and in Flickr8k_text/)")
    captions = _parse_token_file(token_file, strict)
    image_dir = _find_image_dir(root)

    split_files = _split_files(token_file.parent)
    split_of: dict[str, str] | None = None
    if split_files:
        split_of = {}
        for split, path in split_files:
            names = [line.strip() for line in read_lines(path, strict) if line.strip()]
            report(path, f"images named here have no captions in {token_file.name}",
                   [n for n in names if n not in captions], strict)
            for name in names:
                split_of.setdefault(name, split)
    return _records(captions, image_dir, split_of, token_file, strict)


def _detect_kaggle(root: Path) -> bool:
    path = root / _KAGGLE_CSV
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(64).decode("utf-8-sig", errors="replace")
    return head.replace(" ", "").lower().startswith("image,caption")


@register("kaggle", detect=_detect_kaggle, looks_for=f"{_KAGGLE_CSV} with the header image,caption")
def read_kaggle(root: Path, strict: bool = False) -> list[Record]:
    """The Kaggle copy of Flickr8k: Images/ and captions.txt (CSV, header image,caption), no split files."""
    root = root.resolve()
    path = root / _KAGGLE_CSV
    if not path.is_file():
        raise CaptionerError(f"{path}: not found (the Kaggle layout has Images/ and {_KAGGLE_CSV})")
    rows = csv.reader(io.StringIO("\n".join(read_lines(path, strict))))
    header = next(rows, None)
    if header is None:
        raise CaptionerError(f"{path}: no captions found (empty file?)")
    if [h.strip().lower() for h in header] != ["image", "caption"]:
        raise CaptionerError(f"{path}: first line should be the header image,caption, got {','.join(header)!r}")
    captions, malformed = _Captions(), []
    for row in rows:
        if not row or not "".join(row).strip():
            continue
        # Image names never hold a comma, so extra fields are a caption with an unquoted comma. Rows carry
        # no caption number, so a repeated row cannot be told from two annotators agreeing: all are kept.
        image, caption = row[0].strip(), ",".join(row[1:]).strip()
        if not (image and caption):
            malformed.append(f"line {rows.line_num}")
            continue
        captions.add(image, caption)
    report(path, "malformed lines, not image,caption", malformed, strict)
    return _records(captions.finish(path), _find_image_dir(root), None, path, strict)
