"""Caption images from the command line.

    python caption.py photo.jpg holiday/ [--checkpoint CKPT ...] [--beam-size 3] [--n-best 1] [--json]

Prints `path<TAB>caption` per image (or JSON with the n-best captions and their scores). A file that
cannot be read gets a one-line error on stderr and the rest are still captioned; the exit status is 1
if any image failed. Without --checkpoint the model shipped in the package is used; --checkpoint given
more than once captions with the ensemble of those models (their next-word probabilities averaged).
"""

import argparse
import json
import sys

from captioner.cli import run_main, setup_logging
from captioner.errors import CaptionerError
from captioner.images import find_images
from captioner.inference import Captioner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a checkpoint from train.py (default: the shipped Flickr8k model); "
                             "give it more than once to caption with their ensemble")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="beam search's GNMT length-normalisation alpha (default 0: summed log-probability)")
    parser.add_argument("--n-best", type=int, default=1, help="captions per image in --json output")
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON list with n-best captions and scores")
    args = parser.parse_args()
    setup_logging()
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
                                                 n_best=args.n_best, length_penalty=args.length_penalty):
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


if __name__ == "__main__":
    run_main(main)
