"""`captioner evaluate`: decode a dataset split and score it with the COCO caption metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.data.records import load_records, normalize_split
from captioner.errors import CaptionerError
from captioner.eval.fluency import fluency_counts, format_fluency
from captioner.eval.metrics import format_table, score_captions
from captioner.inference import Captioner
from captioner.vision.features import extract_features


def run(args: argparse.Namespace) -> int:
    split = normalize_split(args.split)
    captioner = Captioner.from_checkpoints(args.checkpoint)
    records = load_records(args.data, format=args.format, splits=[split])
    if not records:
        raise CaptionerError(f"{args.data}: the {split} split is empty or absent")
    if args.limit < 0:
        raise CaptionerError(f"--limit must be 0 (all) or positive, got {args.limit}")
    records = records[: args.limit or None]
    store = extract_features(captioner.encoder, [r.image for r in records], Path(args.cache_dir))
    records = [r for r in records if r.image in store]
    hyps = captioner.caption_features(store.get([r.image for r in records]), beam_size=args.beam_size,
                                      max_len=args.max_len, length_penalty=args.length_penalty,
                                      no_repeat_ngram=args.no_repeat_ngram, end_guard=args.end_guard,
                                      no_repeat_word=args.repeat_guard)
    keys = [str(r.image) for r in records]
    captions = {k: captioner.text(h[0]) for k, h in zip(keys, hyps)}
    references = {k: list(r.captions) for k, r in zip(keys, records)}
    scores = score_captions(references, captions, meteor=not args.no_meteor)
    print(format_table(scores.totals, len(records)))
    fluency = fluency_counts(captions[k] for k in keys)
    print(format_fluency(fluency))
    if args.json:
        # One checkpoint is named as before; an ensemble lists its members.
        described = args.checkpoint if len(args.checkpoint) > 1 else str((args.checkpoint or ["shipped"])[0])
        out = {
            "checkpoint": described, "data": str(args.data), "split": split,
            "beam_size": args.beam_size, "length_penalty": args.length_penalty, "images": len(records),
            "no_repeat_ngram": args.no_repeat_ngram, "end_guard": args.end_guard,
            "repeat_guard": args.repeat_guard,
            "totals": scores.totals, "fluency": fluency,
            "per_image": [{"image": str(r.image), "caption": captions[k], "references": references[k],
                           "scores": scores.per_image.get(k, {})} for k, r in zip(keys, records)],
        }
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0
