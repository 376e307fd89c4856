"""The models shipped inside the package, by name, with what a user needs to choose one; and how a
checkpoint argument (a shipped model's name, a file, an ensemble run's folder) becomes the files to load.

    list_pretrained()                    # ['flickr8k', 'flickr8k-2', 'flickr8k-3', 'flickr8k-ensemble']
    get_pretrained("flickr8k")           # its Pretrained entry: members, encoder, dev scores, size, licence...
    resolve(["flickr8k"])                # [.../captioner/pretrained/flickr8k.pt]
    resolve([])                          # the default (DEFAULT): the ensemble's three member files

Every shipped model is one entry of SHIPPED, a named record of its metadata, as timm keeps a pretrained
config per model; this is the only place that knows them (captioner.checkpoint reads the file format,
`captioner models` prints this table). The .pt files lie beside this module. Nothing here imports torch, so
the `captioner` command checks its checkpoint arguments before it loads anything.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from captioner.errors import CaptionerError
from captioner.run_layout import BEST, LAST, member_dirs

FOLDER = Path(__file__).resolve().parent

# Scores are x100 on the Flickr8k dev split (1,000 images), beam 3, the default guards, as
# `captioner evaluate --data ../shared/datasets/flickr8k --split val` prints them (docs/results.md).
METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
FLICKR8K_LICENCE = ("research use only: trained on Flickr8k, whose terms restrict it to research "
                    "(Hodosh, Young and Hockenmaier, 2013)")
ENCODER = "efficientnet_lite0 (frozen, ImageNet weights)"
DECODER = "GRU, embedding 512, hidden 512, v at every step and setting h_0"
MEMBER_COMMAND = ("captioner train --config flickr8k --set train.seed={seed} --set train.scst_epochs=20 "
                  "--data ../shared/datasets/flickr8k")


@dataclass(frozen=True)
class Pretrained:
    """One shipped model: a single decoder (one file) or an ensemble of shipped single ones."""

    name: str                        # what --checkpoint and from_pretrained take
    members: tuple[str, ...]         # the shipped files it loads (NAME.pt beside this module), in order
    description: str
    encoder: str
    decoder: str
    data: str                        # what it was trained on
    dev_scores: tuple[tuple[str, float], ...]  # (metric, x100) on Flickr8k dev, beam 3, no reranking or tags; () if not measured alone
    train_command: str
    train_minutes: float | None      # wall clock on the 2-core CPU it was trained on (docs/results.md)
    licence: str

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def files(self) -> list[Path]:
        """Its members' files; CaptionerError naming one that this install lacks."""
        return [_shipped_file(member) for member in self.members]

    def size_bytes(self) -> int:
        """The size of its files on disk (0 for a file that is missing)."""
        return sum((FOLDER / f"{m}.pt").stat().st_size for m in self.members if (FOLDER / f"{m}.pt").is_file())

    def to_dict(self) -> dict:
        return {"name": self.name, "members": list(self.members), "description": self.description,
                "encoder": self.encoder, "decoder": self.decoder, "data": self.data,
                "dev_scores": dict(self.dev_scores), "size_bytes": self.size_bytes(),
                "train_command": self.train_command, "train_minutes": self.train_minutes, "licence": self.licence}


def _scores(*values: float) -> tuple[tuple[str, float], ...]:
    return tuple(zip(METRICS, values))


SHIPPED: tuple[Pretrained, ...] = (
    Pretrained("flickr8k", ("flickr8k",), "the ensemble's first member (seed 0) alone: the fastest",
               ENCODER, DECODER, "Flickr8k train", _scores(66.2, 21.6, 20.0, 46.4, 55.6),
               MEMBER_COMMAND.format(seed=0), 39.4, FLICKR8K_LICENCE),
    Pretrained("flickr8k-2", ("flickr8k-2",), "the ensemble's second member (seed 1)",
               ENCODER, DECODER, "Flickr8k train", _scores(65.4, 22.0, 20.0, 46.4, 55.4),
               MEMBER_COMMAND.format(seed=1), 50.2, FLICKR8K_LICENCE),
    Pretrained("flickr8k-3", ("flickr8k-3",), "the ensemble's third member (seed 2)",
               ENCODER, DECODER, "Flickr8k train", (),
               MEMBER_COMMAND.format(seed=2), 50.5, FLICKR8K_LICENCE),
    Pretrained("flickr8k-ensemble", ("flickr8k", "flickr8k-2", "flickr8k-3"),
               "beam search averages its three members' next-word probabilities",
               ENCODER, f"3 x {DECODER}", "Flickr8k train", _scores(66.5, 22.8, 20.3, 46.9, 58.3),
               "captioner train --config flickr8k-ensemble --data ../shared/datasets/flickr8k", 140.0,
               FLICKR8K_LICENCE),
)
_BY_NAME = MappingProxyType({model.name: model for model in SHIPPED})

DEFAULT = "flickr8k-ensemble"  # what captions when no checkpoint is named
SINGLE = "flickr8k"  # the single shipped model: the fastest, and what `analyze` looks inside


def list_pretrained(filter: str = "") -> list[str]:  # noqa: A002 - timm's name for the pattern
    """The shipped models' names, sorted; `filter` is a shell-style pattern ("flickr8k*"), as in timm."""
    return sorted(name for name in _BY_NAME if not filter or fnmatch.fnmatch(name, filter))


def get_pretrained(name: str) -> Pretrained:
    """The entry of the shipped model `name`; CaptionerError listing them for another name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CaptionerError(f"{name}: not a shipped model's name (shipped: {', '.join(list_pretrained())})") \
            from None


def default_members() -> tuple[str, ...]:
    """The names of the single models that, ensembled, are the default captioner."""
    return _BY_NAME[DEFAULT].members


def describe(names_or_paths: Sequence[str | Path]) -> str:
    """A checkpoint argument as a line of text: "the shipped ensemble (flickr8k, flickr8k-2, flickr8k-3)",
    "flickr8k", "the ensemble of a.pt and b.pt"."""
    names = [str(n) for n in names_or_paths]
    if not names or names == [DEFAULT]:
        return f"the shipped ensemble ({', '.join(default_members())})"
    if len(names) == 1:
        return names[0]
    return f"the ensemble of {', '.join(names[:-1])} and {names[-1]}"


# ---- a checkpoint argument -> the files it names ------------------------------------------------------
def resolve_one(name_or_path: str | Path | None) -> Path:
    """None or a single shipped model's name ("flickr8k") -> its file; otherwise a checkpoint file's path.

    None is the single shipped model (SINGLE); a shipped ensemble's name is refused (it is several files)."""
    if name_or_path is None:
        return _shipped_file(SINGLE)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.name != str(name_or_path) or path.suffix in (".pt", ".pth"):  # a path, not a name
        if path.is_dir():
            inside = next((path / name for name in (BEST, LAST) if (path / name).is_file()), None)
            hint = f" (the checkpoint in it: {inside})" if inside else ""
            raise CaptionerError(f"{name_or_path}: is a directory, not a checkpoint file{hint}")
        raise CaptionerError(f"{name_or_path}: checkpoint not found")
    model = _BY_NAME.get(str(name_or_path))
    if model is None:
        raise CaptionerError(f"{name_or_path}: neither a checkpoint file nor a shipped model's name "
                             f"(shipped: {', '.join(list_pretrained())})")
    if model.ensemble:
        raise CaptionerError(f"{name_or_path}: the shipped ensemble of {', '.join(model.members)}; this takes "
                             f"one model (e.g. {model.members[0]})")
    return _shipped_file(model.members[0])


def resolve(names_or_paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files, shipped models' names (an ensemble's name: its members) or ensemble run folders
    (their members' best checkpoints) -> the files to load, in order; none named -> the default's."""
    if not names_or_paths:
        return _BY_NAME[DEFAULT].files()
    files: list[Path] = []
    for item in names_or_paths:
        members, model = member_checkpoints(item), _BY_NAME.get(str(item))
        if members:  # a folder of the user's wins over a shipped name, as a file does in resolve_one
            files.extend(members)
        elif model is not None and not Path(item).expanduser().is_file():
            files.extend(model.files())
        else:
            files.append(resolve_one(item))
    return files


def member_checkpoints(run_dir: str | Path) -> list[Path]:
    """The best checkpoints of an ensemble run's members (RUN_DIR/member-i/best.pt, in member order); [] when
    `run_dir` is not such a folder. A member without a best checkpoint yet is an error naming it."""
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        return []
    members = member_dirs(folder)
    unfinished = [str(d) for d in members if not (d / BEST).is_file()]
    if unfinished:
        raise CaptionerError(f"{folder}: ensemble members without a {BEST} yet: {', '.join(unfinished)}")
    return [d / BEST for d in members]


def _shipped_file(name: str) -> Path:
    path = FOLDER / f"{name}.pt"
    if not path.is_file():
        raise CaptionerError(f"the shipped model {path} is missing from this install; pass --checkpoint")
    return path
