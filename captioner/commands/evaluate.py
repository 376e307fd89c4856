"""`captioner evaluate`: decode a dataset split and score it with the COCO caption metrics."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioner import pretrained
from captioner.data.records import SPLITS, Record, load_records, normalize_split, report
from captioner.cli import decoding_of
from captioner.errors import CaptionerError
from captioner.atomic import atomic_write_text
from captioner.eval.gallery import check_page_path
from captioner.eval.fluency import fluency_counts, format_fluency
from captioner.eval.hallucination import format_hallucination, object_hallucination
from captioner.eval.metrics import format_table, score_captions

if TYPE_CHECKING:  # the command imports torch only once its arguments are checked
    from captioner.checkpoint import LoadedModel

log = logging.getLogger("captioner")


def pick_split(asked: str | None, present: set[str], data: str) -> str:
    """The split to score: the one asked for (CaptionerError naming those present if it is absent), or,
    when none is asked for, test where the data has one, else val (with a note)."""
    have = [s for s in SPLITS if s in present]
    if asked is not None:
        split = normalize_split(asked)
        if split not in present:
            raise CaptionerError(f"{data}: no {split} split (the data has: {', '.join(have) or 'no images'})")
        return split
    if "test" in present:
        return "test"
    if "val" in present:
        log.info("note: %s has no test split; scoring val (pass --split to choose)", data)
        return "val"
    raise CaptionerError(f"{data}: neither a test nor a val split to score (the data has: "
                         f"{', '.join(have) or 'no images'}); pass --split")


def held_out_as_val(records: list[Record], files: Sequence[Path], loaded: LoadedModel, data: str) -> list[Record]:
    """For data without a val split: the training images held out as dev when the checkpoints `files` were
    trained (recorded in them, see captioner.data.holdout; `loaded` is the model they make, an ensemble's
    members in the order of `files`) become its val split, and leave train. Unchanged when the checkpoints
    record no such slice."""
    recorded = {}
    for path, member in zip(files, loaded.members or (loaded,)):
        held = member.holdout(path)
        if held is not None:
            recorded[path] = held
    if not recorded:
        return records
    first, held = next(iter(recorded.items()))
    for path, other in recorded.items():
        if set(other.images) != set(held.images):
            raise CaptionerError(f"{first} and {path} were selected on different held-out dev images; "
                                 "evaluate them one at a time")
    out, missing = held.apply(records, data)
    if len(missing) == len(held.images):
        raise CaptionerError(f"{data}: none of the {len(held.images)} held-out dev images recorded in {first} "
                             f"are among its training images (first: {missing[0]}); is this the dataset it "
                             "was trained on?")
    report(first, f"held-out dev images it records are not among {data}'s training images", missing, False)
    log.info("%s has no val split: val is the %d training images that %s held out as dev (data.holdout = %g, "
             "seed %d), train the others", data, len(held.images) - len(missing), first, held.fraction, held.seed)
    return out


def write_report(path: Path, report: dict) -> Path:
    """The --json file, whole or not at all (captioner.atomic): a kill or a full disk keeps the old one."""
    return atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False))


def run(args: argparse.Namespace) -> int:
    # The arguments are checked before the data and the model load: a mistake answers at once.
    if args.limit < 0:
        raise CaptionerError(f"--limit must be 0 (all) or positive, got {args.limit}")
    decoding = decoding_of(args)
    if args.html:
        check_page_path(args.html)
    if args.json and not Path(args.json).parent.is_dir():
        raise CaptionerError(f"{Path(args.json).parent}: no such folder for the --json file")
    if not Path(args.data).exists():
        raise CaptionerError(f"{args.data}: no such folder (--data)")
    pretrained.resolve(args.checkpoint)  # a wrong name or a missing checkpoint file

    from captioner.device import resolve_device
    from captioner.inference import Captioner
    from captioner.precision import announce, resolve
    from captioner.vision.features import extract_features

    all_records = load_records(args.data, format=args.format)
    device = resolve_device(args.device)
    precision = resolve(args.precision, device.type)
    captioner = None
    if not any(r.split == "val" for r in all_records):  # the model, loaded once, says which images were dev
        captioner = Captioner.from_checkpoints(args.checkpoint, device, precision=precision)
        all_records = held_out_as_val(all_records, pretrained.resolve(args.checkpoint), captioner.loaded, args.data)
    split = pick_split(args.split, {r.split for r in all_records}, str(args.data))
    records = [r for r in all_records if r.split == split]
    if captioner is None:
        captioner = Captioner.from_checkpoints(args.checkpoint, device, precision=precision)
    records = records[: args.limit or None]
    announce(precision, verbose_only=True)  # once the model and the split have loaded: a bad input stays one line
    store = extract_features(captioner.encoder, [r.image for r in records], Path(args.cache_dir),
                             precision=precision)
    records = [r for r in records if r.image in store]
    hyps = captioner.caption_features(store.get([r.image for r in records]), decoding)
    keys = [str(r.image) for r in records]
    captions = {k: captioner.text(h[0]) for k, h in zip(keys, hyps)}
    references = {k: list(r.captions) for k, r in zip(keys, records)}
    scores = score_captions(references, captions, meteor=not args.no_meteor)
    print(format_table(scores.totals, len(records)))
    fluency = fluency_counts(captions[k] for k in keys)
    print(format_fluency(fluency))
    objects = object_hallucination(captions, references)
    print(format_hallucination(objects))
    # One checkpoint is named as before; an ensemble lists its members.
    named = args.checkpoint or [f"shipped {name}" for name in pretrained.default_members()]
    described = named if len(named) > 1 else str(named[0])  # the JSON file's field, as it has always been
    if args.json:
        out = {
            "checkpoint": described, "data": str(args.data), "split": split,
            "beam_size": decoding.beam_size, "length_penalty": decoding.length_penalty, "images": len(records),
            "no_repeat_ngram": decoding.guards.no_repeat_ngram, "end_guard": decoding.guards.end,
            "repeat_guard": decoding.guards.repeat_word,
            "rerank": {"n_best": decoding.rerank.n_best, "beam": decoding.rerank.beam,
                       "weight": decoding.rerank.weight, "k": decoding.rerank.k,
                       "index": captioner.judged is not None},
            "open_vocab": {"enabled": decoding.open_vocab.enabled, "copy": decoding.open_vocab.copy,
                           "must": decoding.open_vocab.must, "floor": decoding.open_vocab.floor,
                           "checked": list(decoding.open_vocab.checked)},
            "totals": scores.totals, "fluency": fluency,
            "hallucination": {k: v for k, v in objects.items() if k != "per_image"},
            "per_image": [{"image": str(r.image), "caption": captions[k], "references": references[k],
                           "scores": scores.per_image.get(k, {}), "hallucinated": objects["per_image"][k],
                           **({"confidence": round(h[0].confidence, 4)} if h[0].confidence is not None else {}),
                           **({"tags": [{"word": w, "probability": p} for w, p in h[0].tags]}
                              if h[0].tags is not None else {})}
                          for k, r, h in zip(keys, records, hyps)],
        }
        write_report(Path(args.json), out)
    if args.html:
        from captioner.eval.gallery import GalleryItem, write_gallery

        items = [GalleryItem(r.image, captions[k], references[k], scores.per_image.get(k, {}),
                             confidence=h[0].confidence, tags=h[0].tags or ())
                 for k, r, h in zip(keys, records, hyps)]
        page = write_gallery(Path(args.html), items, title=f"{Path(args.data).name} {split}",
                             totals=scores.totals,
                             subtitle=f"{pretrained.describe(args.checkpoint)}, beam {decoding.beam_size}:")
        log.info("gallery: %s", page)
    return 0
