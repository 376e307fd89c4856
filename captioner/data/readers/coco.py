"""Reader for MS-COCO's official caption annotations, through pycocotools.

    annotations/captions_train2017.json   (or captions_val2017.json, or the 2014 pair)
    train2017/*.jpg, val2017/*.jpg        (train2014/, val2014/ for the 2014 files)

The train file gives split "train" and the val file "val"; COCO publishes no test captions, so there is no
"test" here (Karpathy's split, dataset_coco.json, has one and is preferred when both are present; see
records.py). When both years are present only the newest is read: 2017 re-partitions the 2014 images, so
reading both would list most images twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from captioner.data.records import Record, keep_existing, register, report
from captioner.errors import CaptionerError

_NAME = re.compile(r"captions_(train|val)(\d{4})\.json$")


def _annotation_files(root: Path) -> list[tuple[str, str, Path]]:
    """(split, year, path) of every official caption file under root/annotations."""
    found = []
    for path in sorted((root / "annotations").glob("captions_*.json")):
        match = _NAME.search(path.name)
        if match and path.is_file():
            found.append((match.group(1), match.group(2), path))
    return found


def _load(path: Path):
    from pycocotools.coco import COCO  # imported here: pycocotools is slow to import and only COCO needs it

    try:
        # pycocotools prints progress lines to stdout; a reader should be quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); truncated download?") from None
    except UnicodeDecodeError:
        raise CaptionerError(f"{path}: not UTF-8 text; is this a COCO caption file?") from None
    except (AssertionError, KeyError, TypeError) as e:
        raise CaptionerError(f"{path}: not a COCO caption file ({e})") from None
    for key in ("images", "annotations"):
        if not isinstance(coco.dataset.get(key), list):
            raise CaptionerError(f'{path}: no "{key}" list; is this a COCO caption file?')
    return coco


@register("coco", detect=lambda root: bool(_annotation_files(root)), looks_for="annotations/captions_*.json")
def read_coco(root: Path, strict: bool = False) -> list[Record]:
    root = root.resolve()
    files = _annotation_files(root)
    if not files:
        raise CaptionerError(f"{root}: no annotations/captions_{{train,val}}{{2014,2017}}.json found")
    newest = max(year for _, year, _ in files)

    records = []
    for split, year, path in files:
        if year != newest:
            continue
        coco = _load(path)
        image_dir = root / f"{split}{year}"
        captions, paths, uncaptioned = {}, {}, []
        for image_id, image in sorted(coco.imgs.items()):
            try:
                name = image["file_name"]
                texts = tuple(a["caption"].strip() for a in coco.imgToAnns.get(image_id, []))
            except (KeyError, AttributeError) as e:
                raise CaptionerError(f"{path}: image {image_id} or its captions lack {e}") from None
            texts = tuple(t for t in texts if t)
            if not texts:
                uncaptioned.append(name)
                continue
            captions[name], paths[name] = texts, image_dir / name
        orphans = sorted(set(coco.imgToAnns) - set(coco.imgs))
        report(path, "image ids have captions but no entry in images", [str(i) for i in orphans], strict)
        report(path, "images have no captions", uncaptioned, strict)
        for name, image in keep_existing(paths, path, f"{image_dir}/", strict).items():
            records.append(Record(image=image, captions=captions[name], split=split))
    return records
