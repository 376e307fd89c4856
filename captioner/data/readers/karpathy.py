"""Reader for Karpathy's split files: dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json.

Each holds {"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw", "tokens"}]}]}.
Split names are train, val, test and, for COCO, restval (val2014 images given to training, so "train").

Images are looked for at `root/<filepath>/<filename>` when the entry has a filepath (COCO: train2014/,
val2014/), else in the first of the usual Flickr image folders under root. COCO images renamed by the 2017
release (train2017/000000391895.jpg for COCO_val2014_000000391895.jpg) are found too, since many people
only have the 2017 download.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from captioner.data.records import Record, keep_existing, normalize_split, register, report
from captioner.errors import CaptionerError

_PATTERN = "dataset_*.json"
# The image folders of the Flickr downloads (as in flickr.py, which this module does not import: the
# readers only depend on records.py).
_FLICKR_IMAGE_DIRS = (
    "Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", "flickr30k-images"
)
_COCO2014_NAME = re.compile(r"COCO_(?:train|val)2014_(\d+)\.jpg$")


def _json_file(root: Path) -> Path:
    found = sorted(p for p in root.glob(_PATTERN) if p.is_file())
    if not found:
        raise CaptionerError(f"{root}: no Karpathy split file ({_PATTERN}) found")
    if len(found) > 1:
        raise CaptionerError(f"{root}: several Karpathy split files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def _load_json(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); truncated download?") from None
    except UnicodeDecodeError:
        raise CaptionerError(f"{path}: not UTF-8 text; is this a Karpathy split file?") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionerError(f'{path}: no "images" list; is this a Karpathy split file?')
    return data["images"]


def _candidates(root: Path, image_dir: Path | None, entry: dict) -> list[Path]:
    filename = entry["filename"]
    if entry.get("filepath"):
        paths = [root / entry["filepath"] / filename]
        match = _COCO2014_NAME.search(filename)
        if match:
            paths += [root / folder / f"{match.group(1)}.jpg" for folder in ("train2017", "val2017")]
        return paths
    return [(image_dir or root) / filename]


@register("karpathy", detect=lambda root: any(root.glob(_PATTERN)), looks_for=_PATTERN)
def read_karpathy(root: Path, strict: bool = False) -> list[Record]:
    root = root.resolve()
    path = _json_file(root)
    image_dir = next((root / d for d in _FLICKR_IMAGE_DIRS if (root / d).is_dir()), None)

    entries: dict[str, tuple[tuple[str, ...], str]] = {}  # key -> (captions, split)
    paths: dict[str, Path] = {}
    uncaptioned = []
    for number, entry in enumerate(_load_json(path)):
        try:
            key = f"{entry.get('filepath') or ''}/{entry['filename']}".lstrip("/")
            split = normalize_split(entry["split"])
            # "raw" is the caption as written; fall back to the tokens for files that dropped it.
            captions = tuple(
                (s.get("raw") or " ".join(s.get("tokens", []))).strip() for s in entry.get("sentences", [])
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise CaptionerError(f"{path}: image entry {number} lacks {e}; is this a Karpathy split file?") from None
        except CaptionerError as e:
            raise CaptionerError(f"{path}: image entry {number}: {e}") from None
        captions = tuple(c for c in captions if c)
        if not captions:
            uncaptioned.append(key)
            continue
        candidates = _candidates(root, image_dir, entry)
        paths[key] = next((p for p in candidates if p.is_file()), candidates[0])
        entries[key] = (captions, split)
    if not entries and not uncaptioned:
        raise CaptionerError(f"{path}: no images listed")
    report(path, "images have no sentences", uncaptioned, strict)

    present = keep_existing(paths, path, f"{image_dir or root}/", strict)
    return [Record(image=p, captions=entries[key][0], split=entries[key][1]) for key, p in present.items()]
