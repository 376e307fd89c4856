"""`captioner caption IMAGE_OR_DIR ...`: print `path<TAB>caption` per image (`path<TAB>score<TAB>caption`
for each of the n-best when --n-best is above 1), or JSON with the n-best; --html also writes a gallery."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioner.commands import guards_of, rerank_of
from captioner.commands.explain import Explainer
from captioner.errors import CaptionerError
from captioner.eval.gallery import check_page_path
from captioner.device import resolve_device
from captioner.inference import Captioner
from captioner.precision import announce, resolve
from captioner.vision.images import find_images


def run(args: argparse.Namespace) -> int:
    # A POSIX file name need not be valid UTF-8 (Python holds such bytes as surrogates): print it back as
    # the same bytes instead of failing with UnicodeEncodeError where stdout is strict (PYTHONIOENCODING).
    sys.stdout.reconfigure(errors="surrogateescape")
    if args.beam_size < 1:
        raise CaptionerError(f"--beam-size must be at least 1, got {args.beam_size}")
    if not 1 <= args.n_best <= args.beam_size:
        raise CaptionerError(f"--n-best must be between 1 and the beam size ({args.beam_size})")

    rerank = rerank_of(args)
    if args.html:
        check_page_path(args.html)
    device = resolve_device(args.device)
    precision = resolve(args.precision, device.type)
    captioner = Captioner.from_checkpoints(args.checkpoint, device, precision=precision)
    announce(precision)  # once the model has loaded: a refused checkpoint stays a one-line error
    explain = Explainer(captioner, args.neighbours, args.min_confidence, rerank)
    paths, failed = [], 0
    for arg in args.paths:  # a missing path or an empty folder is reported, the others still run
        try:
            paths.extend(find_images([arg]))
        except CaptionerError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
    paths = list(dict.fromkeys(paths))  # a file named twice is captioned once
    results, gallery = [], []
    for path, result in captioner.caption_images(paths, beam_size=args.beam_size, max_len=args.max_len,
                                                 n_best=args.n_best, length_penalty=args.length_penalty,
                                                 guards=guards_of(args), rerank=rerank):
        if isinstance(result, CaptionerError):
            failed += 1
            print(f"error: {result}", file=sys.stderr)
            continue
        if args.html:
            gallery.append((path, result))
        if args.json:
            results.append({"path": str(path), "caption": result.caption, **explain.fields(result.hypotheses[0]),
                            "n_best": [{**captioner.as_dict(h), "log_prob": round(h.log_prob, 4)}
                                       for h in result.hypotheses]})
        elif args.n_best > 1:
            for h in result.hypotheses:
                print(f"{path}\t{h.score:.4f}\t{explain.mark(h)}{captioner.text(h)}", flush=True)
        else:
            print(f"{path}\t{explain.mark(result.hypotheses[0])}{result.caption}", flush=True)
        if not args.json:
            for line in explain.lines(result.hypotheses[0]):
                print(f"{path}\t{line}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.html:
        from captioner.eval.gallery import GalleryItem, write_gallery

        items = [GalleryItem(Path(path), r.caption, n_best=[(captioner.text(h), h.score) for h in r.hypotheses],
                             **explain.gallery(r.hypotheses[0])) for path, r in gallery]
        page = write_gallery(Path(args.html), items, title="captions",
                             subtitle=f"{described(args.checkpoint)}, beam {args.beam_size}:")
        print(f"gallery: {page}", file=sys.stderr)
    if explain.flagged:
        print(f"{explain.flagged} caption(s) under --min-confidence {args.min_confidence:g}, marked `?`",
              file=sys.stderr)
    return 1 if failed else 0


def described(checkpoints: list[str]) -> str:
    return ", ".join(map(str, checkpoints)) if checkpoints else "the shipped ensemble"
