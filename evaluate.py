"""Score a captioner on a dataset split exactly as the captioning papers do (COCO caption evaluation).

    python evaluate.py --data ../shared/datasets/flickr8k --split val [--checkpoint CKPT ...]
                       [--beam-size 3] [--json OUT]

Decodes every image of the split (from the feature cache when present, extracting what is missing),
prints BLEU-1..4, METEOR, ROUGE-L and CIDEr (x100) with the number of images scored, and writes the
per-image captions, references and scores plus the totals to OUT. Without --checkpoint it evaluates the
model shipped in the package; --checkpoint given more than once evaluates the ensemble of those models.
"""

import argparse
import json
from pathlib import Path

from captioner.cli import run_main, setup_logging
from captioner.data.records import load_records, normalize_split
from captioner.errors import CaptionerError
from captioner.features import extract_features
from captioner.inference import Captioner
from captioner.metrics import format_table, score_captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a checkpoint from train.py (default: the shipped model); "
                             "give it more than once to evaluate their ensemble")
    parser.add_argument("--data", required=True, help="dataset root, any layout the readers know")
    parser.add_argument("--format", default="auto", help="force the dataset format (default: detected)")
    parser.add_argument("--split", default="test", help="train, val (or dev), test (default: test)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="beam search's GNMT length-normalisation alpha (default 0: summed log-probability)")
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--cache-dir", default="cache", help="feature cache (default: ./cache)")
    parser.add_argument("--limit", type=int, default=0, help="score only the split's first N images (0: all)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
    parser.add_argument("--json", metavar="OUT", help="write per-image captions, references and scores here")
    args = parser.parse_args()
    setup_logging()

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
                                      max_len=args.max_len, length_penalty=args.length_penalty)
    keys = [str(r.image) for r in records]
    captions = {k: captioner.text(h[0]) for k, h in zip(keys, hyps)}
    references = {k: list(r.captions) for k, r in zip(keys, records)}
    scores = score_captions(references, captions, meteor=not args.no_meteor)
    print(format_table(scores.totals, len(records)))
    if args.json:
        # One checkpoint is named as before; an ensemble lists its members.
        described = args.checkpoint if len(args.checkpoint) > 1 else str((args.checkpoint or ["shipped"])[0])
        out = {
            "checkpoint": described, "data": str(args.data), "split": split,
            "beam_size": args.beam_size, "length_penalty": args.length_penalty, "images": len(records), "totals": scores.totals,
            "per_image": [{"image": str(r.image), "caption": captions[k], "references": references[k],
                           "scores": scores.per_image.get(k, {})} for k, r in zip(keys, records)],
        }
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_main(main)
