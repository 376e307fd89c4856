"""Reader for Hugging Face's `imagefolder` layout: images beside a metadata file of captions.

    photos/
        metadata.jsonl        {"file_name": "a.jpg", "text": "a dog on a beach"}  one row per caption,
        a.jpg                 or {"file_name": "a.jpg", "text": ["a dog on a beach", "a wet dog"]}
        b.jpg
    or metadata.csv           header file_name,text; one row per caption

The captions' column may also be called `caption` or `captions` (the names datasets use most); a file with
none of them is an error that names the columns it has and the one to rename.

Splits go in subfolders (train/, validation/, test/; any spelling `normalize_split` knows, e.g. val/,
dev/), each with its own metadata file; a metadata file at the top names its images relative to itself,
so a row "train/a.jpg" there is in train. The split is where the image's name is, not where a symbolic
link there points. Everything else is train (and with no val split, training holds out dev images: see
captioner/data/holdout.py). A file_name is relative to its metadata file's folder and must stay inside
the dataset's folder (no absolute paths, no `..` leading out); rows naming the same image merge their
captions, in file order. Other columns are ignored.

Bad rows follow the policy of records.py: one counted warning per kind (bad JSON or missing keys, an
empty caption or one without words, a file_name that leaves the dataset folder, a missing image), naming
the file and the first culprits, and the rest still read; `strict` makes each an error. A row repeated
verbatim is counted and dropped, as the Flickr reader drops a repeated line; an overlong caption is cut
(records.py, `trim_caption`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from captioner.data.records import (MAX_CAPTION_WORDS, Record, keep_existing, log, normalize_split, read_lines,
                                    register, report, trim_caption)
from captioner.errors import CaptionerError

_METADATA = ("metadata.jsonl", "metadata.csv")
_CAPTION_COLUMNS = ("text", "caption", "captions")  # the first one a row has holds its captions
_RENAME = "rename the column holding the captions to text (or caption, captions)"
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _split_of_folder(name: str) -> str | None:
    try:
        return normalize_split(name)
    except CaptionerError:
        return None


def _metadata_in(folder: Path) -> Path | None:
    found = [folder / name for name in _METADATA if (folder / name).is_file()]
    if len(found) > 1:
        raise CaptionerError(f"{folder}: both metadata.jsonl and metadata.csv; keep one")
    return found[0] if found else None


def _metadata_files(root: Path) -> list[Path]:
    """The metadata files: at the root and in its split subfolders."""
    folders = [root] + [sub for sub in sorted(root.iterdir()) if sub.is_dir() and _split_of_folder(sub.name)]
    return [path for path in map(_metadata_in, folders) if path is not None]


def _detect(root: Path) -> bool:
    folders = [root] + [sub for sub in root.iterdir() if sub.is_dir() and _split_of_folder(sub.name)]
    return any((folder / name).is_file() for folder in folders for name in _METADATA)


class _Rows:
    """What one metadata file's rows say, and what was wrong with the others."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = path, root
        self.captions: dict[str, list[str]] = {}  # file_name -> captions, in file order
        self.malformed: list[str] = []
        self.empty: list[str] = []
        self.outside: list[str] = []  # file_names leaving the dataset folder
        self.cut: list[str] = []  # captions longer than MAX_CAPTION_WORDS, cut
        self.duplicated: list[str] = []
        self.seen: set[tuple[str, str]] = set()

    def add(self, where: str, file_name, text) -> None:
        texts = text if isinstance(text, list) else [text]
        if not (isinstance(file_name, str) and file_name.strip()) or not all(isinstance(t, str) for t in texts):
            self.malformed.append(where)
            return
        file_name = file_name.strip()
        row = (file_name, json.dumps(texts))
        if row in self.seen:
            self.duplicated.append(where)
            return
        self.seen.add(row)
        if _outside(self.path.parent, file_name, self.root):
            self.outside.append(f"{where}: {file_name}")
            return
        kept = []
        for t in texts:
            caption, cut = trim_caption(t.strip())
            if caption:
                kept.append(caption)
                if cut:
                    self.cut.append(where)
        if not kept:
            self.empty.append(where)
            return
        self.captions.setdefault(file_name, []).extend(kept)

    def report(self, strict: bool) -> None:
        if self.duplicated:  # harmless once dropped, so a warning even in strict mode (as the Flickr reader)
            log.warning("%s: %d duplicate rows ignored (first: %s)", self.path, len(self.duplicated),
                        ", ".join(self.duplicated[:3]))
        report(self.path, "rows whose file_name leaves the dataset folder", self.outside, strict)
        report(self.path, "rows with an empty caption", self.empty, strict)  # blank, or no words at all
        report(self.path, f"captions longer than {MAX_CAPTION_WORDS} words", self.cut, strict,
               action=f"cut to {MAX_CAPTION_WORDS} words")


def _outside(folder: Path, file_name: str, root: Path) -> bool:
    """Whether `file_name` (relative to `folder`) names a path outside `root`, said without following links."""
    if os.path.isabs(file_name) or Path(file_name).drive:
        return True
    return not Path(os.path.normpath(folder / file_name)).is_relative_to(root)


def _caption_column(names) -> str | None:
    return next((c for c in _CAPTION_COLUMNS if c in names), None)


def _read_jsonl(path: Path, root: Path, strict: bool) -> _Rows:
    rows = _Rows(path, root)
    keys_without_caption: list[str] | None = None  # the keys of the first row without a caption column
    for number, line in enumerate(read_lines(path, strict), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            rows.malformed.append(f"line {number}")
            continue
        column = _caption_column(row) if isinstance(row, dict) else None
        if isinstance(row, dict) and column is None and keys_without_caption is None:
            keys_without_caption = list(row)
        if not isinstance(row, dict) or "file_name" not in row or column is None:
            rows.malformed.append(f"line {number}")
            continue
        rows.add(f"line {number}", row["file_name"], row[column])
    if not rows.captions and keys_without_caption is not None:
        raise CaptionerError(f"{path}: no caption column in its rows (keys: {', '.join(keys_without_caption)}); "
                             f"{_RENAME}")
    report(path, 'malformed rows, not JSON with "file_name" and "text"', rows.malformed, strict)
    return rows


def _read_csv(path: Path, root: Path, strict: bool) -> _Rows:
    rows = _Rows(path, root)
    reader = csv.reader(io.StringIO("\n".join(read_lines(path, strict))))
    header = next(reader, None)
    if header is None:
        raise CaptionerError(f"{path}: no captions found (empty file?)")
    names = [h.strip() for h in header]
    column = _caption_column(names)
    if "file_name" not in names or column is None:
        rename = [] if column else [_RENAME]
        rename += [] if "file_name" in names else ["rename the column of image file names to file_name"]
        raise CaptionerError(f"{path}: first line should be a header with the columns file_name and text, "
                             f"got {','.join(header)!r}; {' and '.join(rename)}")
    at_name, at_text = names.index("file_name"), names.index(column)
    for row in reader:
        if not row or not "".join(row).strip():
            continue
        where = f"line {reader.line_num}"
        if len(row) != len(names):
            rows.malformed.append(where)
            continue
        rows.add(where, row[at_name], row[at_text])
    report(path, "malformed rows, not as many fields as the header file_name,text", rows.malformed, strict)
    return rows


def _unlisted_images(folder: Path, listed: set[Path], skip: set[Path]) -> list[str]:
    """Images under `folder` (outside the `skip` folders) that no metadata row names."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file() and path not in listed:
            if not any(s in path.parents for s in skip):
                found.append(path.relative_to(folder).as_posix())
    return found


@register("imagefolder", detect=_detect,
          looks_for="metadata.jsonl or metadata.csv here or in train/, validation/, test/")
def read_imagefolder(root: Path, strict: bool = False) -> list[Record]:
    root = root.resolve()
    files = _metadata_files(root)
    if not files:
        raise CaptionerError(f"{root}: no metadata.jsonl or metadata.csv here or in train/, validation/, test/")
    captions: dict[Path, list[str]] = {}
    split_of: dict[Path, str] = {}
    for path in files:
        rows = (_read_jsonl if path.suffix == ".jsonl" else _read_csv)(path, root, strict)
        rows.report(strict)
        if not rows.captions:
            bad = f" ({len(rows.malformed)} malformed rows, {len(rows.empty)} with an empty caption)" \
                if rows.malformed or rows.empty else " (empty file?)"
            raise CaptionerError(f"{path}: no captions found{bad}")
        folder = path.parent
        # Where the name is, not where a link there points: the split comes from the folder it is in.
        named = {name: Path(os.path.normpath(folder / name)) for name in rows.captions}
        for name, image in keep_existing(named, path, f"{folder}/", strict).items():
            relative = image.relative_to(root).parts if image.is_relative_to(root) else ()
            split = _split_of_folder(relative[0]) if len(relative) > 1 else None
            captions.setdefault(image, []).extend(rows.captions[name])
            split_of[image] = split or "train"
        split_folders = {p.parent for p in files if p.parent != folder and folder in p.parents}
        unlisted = _unlisted_images(folder, set(named.values()), split_folders)
        if unlisted:
            shown = ", ".join(unlisted[:3]) + (", ..." if len(unlisted) > 3 else "")
            log.info("%s: %d images in %s have no caption row, so are not used (first: %s)", path,
                     len(unlisted), folder, shown)
    return [Record(image=image, captions=tuple(texts), split=split_of[image]) for image, texts in captions.items()]
