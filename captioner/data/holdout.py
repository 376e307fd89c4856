"""A dev slice held out of the training images, for datasets that ship no val split.

A model is selected on dev images, so a dataset with only training images (coco-mini, a folder of one's
own photos) gives up a seeded slice of them: `data.holdout` of the training images (at least one), chosen
by image, never by caption, so no held-out image has a caption in training.

The choice is a pure function of the seed and the images' paths relative to the dataset root: each image
is ranked by a sha256 of (seed, relative path) and the lowest ranks are held out. So it is the same in
every process and on every machine, and an image keeps its side when others are added. The slice is
nevertheless recorded (the run directory's holdout.txt and every checkpoint), so that `--resume` and
`captioner evaluate --checkpoint` use exactly the images the model was selected on, even if the dataset
changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.atomic import atomic_write_text
from captioner.data.records import Record, sort_records
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

FILE_NAME = "holdout.txt"  # in the run directory: one held-out image per line, relative to the data root


@dataclass(frozen=True)
class Holdout:
    """Which training images were held out as dev: paths relative to the dataset root, sorted."""

    images: tuple[str, ...]
    fraction: float
    seed: int
    of: int  # how many training images there were to choose from
    split: str = "train"  # the split the slice was taken from

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images": list(self.images)}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "checkpoint") -> Holdout:
        try:
            return cls(images=tuple(str(p) for p in raw["images"]), fraction=float(raw["fraction"]),
                       seed=int(raw["seed"]), of=int(raw["of"]), split=str(raw.get("split", "train")))
        except (KeyError, TypeError, ValueError) as err:
            raise CaptionerError(f"{source}: damaged record of the held-out dev images ({err})") from None

    def apply(self, records: Iterable[Record], root: Path | str) -> tuple[list[Record], list[str]]:
        """The records with the held-out training images relabelled "val", and the held-out paths not
        found among the training images (a dataset changed since)."""
        records = list(records)
        wanted = set(self.images)
        keys = [_key(r.image, root).split("/") if r.split == self.split else None for r in records]
        # Paths relative to the root, or to one folder below it (evaluate may be pointed one level above the
        # dataset folder that training read, which records.py accepts): the first depth that matches counts.
        for depth in range(max((len(k) for k in keys if k), default=0)):
            matched = ["/".join(k[depth:]) if k and "/".join(k[depth:]) in wanted else None for k in keys]
            if any(matched):
                break
        else:
            matched = [None] * len(records)
        out = [dataclasses.replace(r, split="val") if m else r for r, m in zip(records, matched)]
        return sort_records(out), sorted(wanted - {m for m in matched if m})

    def describe(self) -> str:
        return (f"held out {len(self.images)} of the {self.of} {self.split} images as dev "
                f"(data.holdout = {self.fraction:g}, seed {self.seed})")


def _key(image: Path, root: Path | str) -> str:
    """An image's path relative to the dataset root, with forward slashes (the same on every machine)."""
    root = Path(root).expanduser().resolve()
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        return image.as_posix()


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"captioner-holdout:{seed}:{key}".encode()).digest()


def choose(records: Iterable[Record], root: Path | str, fraction: float, seed: int) -> Holdout:
    """Hold out round(fraction * N) of the N training images (at least one, and never all of them)."""
    keys = sorted({_key(r.image, root) for r in records if r.split == "train"})
    if not 0 < fraction < 1:
        raise CaptionerError(f"data.holdout must be above 0 and below 1 to hold out dev images, got {fraction}")
    if len(keys) < 2:
        raise CaptionerError(f"{root}: the dataset has no val/dev images and {len(keys)} training image(s), "
                             "too few to hold one out as dev")
    n = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    held = sorted(sorted(keys, key=lambda k: _rank(seed, k))[:n])
    return Holdout(images=tuple(held), fraction=fraction, seed=seed, of=len(keys))


def write(run_dir: Path, holdout: Holdout) -> None:
    atomic_write_text(run_dir / FILE_NAME, "".join(f"{p}\n" for p in holdout.images))


def read_listed(path: Path) -> list[str]:
    """The image paths a holdout.txt lists."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
