"""`captioner caption IMAGE_OR_DIR ...`: print `path<TAB>caption` per image, or JSON with the n-best."""

from __future__ import annotations

import argparse
import json
import sys

from captioner.errors import CaptionerError
from captioner.inference import Captioner
from captioner.vision.images import find_images


def run(args: argparse.Namespace) -> int:
    # A POSIX file name need not be valid UTF-8 (Python holds such bytes as surrogates): print it back as
    # the same bytes instead of failing with UnicodeEncodeError where stdout is strict (PYTHONIOENCODING).
    sys.stdout.reconfigure(errors="surrogateescape")
    if args.beam_size < 1:
        raise CaptionerError(f"--beam-size must be at least 1, got {args.beam_size}")
    if not 1 <= args.n_best <= args.beam_size:
        raise CaptionerError(f"--n-best must be between 1 and the beam size ({args.beam_size})")

    captioner = Captioner.from_checkpoints(args.checkpoint)
    paths, failed = [], 0
    for arg in args.paths:  # a missing path or an empty folder is reported, the others still run
        try:
            paths.extend(find_images([arg]))
        except CaptionerError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
    paths = list(dict.fromkeys(paths))  # a file named twice is captioned once
    results = []
    for path, result in captioner.caption_images(paths, beam_size=args.beam_size, max_len=args.max_len,
                                                 n_best=args.n_best, length_penalty=args.length_penalty,
                                                 no_repeat_ngram=args.no_repeat_ngram,
                                                 end_guard=args.end_guard,
                                                 no_repeat_word=args.repeat_guard):
        if isinstance(result, CaptionerError):
            failed += 1
            print(f"error: {result}", file=sys.stderr)
        elif args.json:
            results.append({"path": str(path), "caption": result.caption,
                            "n_best": [{"caption": captioner.text(h), "score": round(h.score, 4),
                                        "log_prob": round(h.log_prob, 4)} for h in result.hypotheses]})
        else:
            print(f"{path}\t{result.caption}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return 1 if failed else 0
