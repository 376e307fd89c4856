"""`captioner caption IMAGE_OR_DIR ...`: print `path<TAB>caption` per image (`path<TAB>score<TAB>caption`
for each of the n-best when --n-best is above 1), or JSON with the n-best; --html also writes a gallery,
--output FILE the captions as JSON lines or CSV.

Every argument is checked (options, output paths, checkpoint names, the images) before torch is imported
or a model loads: a mistyped path answers at once. A progress bar runs on stderr where it is a terminal.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import mimetypes
import sys
from pathlib import Path

from captioner import pretrained
from captioner.atomic import atomic_write
from captioner.cli import decoding_of
from captioner.commands.explain import Explainer
from captioner.errors import CaptionerError
from captioner.eval.gallery import check_page_path
from captioner.vision.images import IMAGE_SUFFIXES, find_images

OUTPUT_FORMATS = {".jsonl": "JSON lines", ".csv": "CSV"}


def run(args: argparse.Namespace) -> int:
    # A POSIX file name need not be valid UTF-8 (Python holds such bytes as surrogates): print it back as
    # the same bytes instead of failing with UnicodeEncodeError where stdout is strict (PYTHONIOENCODING).
    sys.stdout.reconfigure(errors="surrogateescape")
    decoding = check_options(args)
    if args.html:
        check_page_path(args.html)
    if args.output:
        check_output_path(args.output)
    files = pretrained.resolve(args.checkpoint)  # a wrong name or a missing file, before anything loads
    paths, failed = [], 0
    for arg in args.paths:  # a missing path or an empty folder is reported, the others still run
        try:
            paths.extend(find_images([arg]))
        except CaptionerError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
    paths = list(dict.fromkeys(paths))  # a file named twice is captioned once
    skipped = skipped_files(args.paths)
    if skipped:
        print(skipped, file=sys.stderr)
    if not paths:
        return 1

    from captioner.device import resolve_device
    from captioner.inference import Captioner
    from captioner.precision import announce, resolve

    device = resolve_device(args.device)
    precision = resolve(args.precision, device.type)
    captioner = Captioner.from_checkpoints(files, device, precision=precision)
    announce(precision, verbose_only=True)  # once the model has loaded: a refused checkpoint stays one line
    explain = Explainer(captioner, args.neighbours, args.min_confidence, decoding.rerank)
    results, gallery, rows = [], [], []
    out = sys.stdout
    captioned = captioner.caption_images(paths, decoding, batch_size=args.batch_size)
    with progress(len(paths)) as bar:
        def emit(line: str, file=out) -> None:
            bar.write(line, file=file)  # above the bar, where there is one
            file.flush()

        for path, result in captioned:
            bar.update(1)
            if isinstance(result, CaptionerError):
                failed += 1
                emit(f"error: {result}", sys.stderr)
                continue
            if args.html:
                gallery.append((path, result))
            n_best = [{**captioner.as_dict(h), "log_prob": round(h.log_prob, 4)} for h in result.hypotheses]
            best = result.hypotheses[0]
            if args.output:
                rows.append({"path": str(path), "caption": result.caption, "n_best": n_best})
            if args.json:
                results.append({"path": str(path), "caption": result.caption, **explain.fields(best),
                                "n_best": n_best})
                continue
            if decoding.n_best > 1:
                for h in result.hypotheses:
                    emit(f"{path}\t{h.score:.4f}\t{explain.mark(h)}{captioner.text(h)}")
            else:
                emit(f"{path}\t{explain.mark(best)}{result.caption}")
            for line in explain.lines(best):
                emit(f"{path}\t{line}")
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.output:
        write_output(Path(args.output), rows)
        print(f"captions: {args.output} ({len(rows)} images)", file=sys.stderr)
    if args.html:
        from captioner.eval.gallery import GalleryItem, write_gallery

        items = [GalleryItem(Path(path), r.caption, n_best=[(captioner.text(h), h.score) for h in r.hypotheses],
                             **explain.gallery(r.hypotheses[0])) for path, r in gallery]
        page = write_gallery(Path(args.html), items, title="captions",
                             subtitle=f"{pretrained.describe(args.checkpoint)}, beam {decoding.beam_size}:")
        print(f"gallery: {page}", file=sys.stderr)
    if explain.flagged:
        print(f"{explain.flagged} caption(s) under --min-confidence {args.min_confidence:g}, marked `?`",
              file=sys.stderr)
    return 1 if failed else 0


def check_options(args: argparse.Namespace):
    """The options' ranges, as one-line errors, before anything loads: the decoding options become their
    Decoding (returned), which checks itself."""
    decoding = decoding_of(args)
    if args.batch_size < 1:
        raise CaptionerError(f"--batch-size must be at least 1, got {args.batch_size}")
    return decoding


# Camera formats that mimetypes does not know as images.
RAW_SUFFIXES = frozenset({".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw"})


def skipped_files(args: list[str]) -> str:
    """One line counting the photos and videos in the folders named in `args` that are not captioned because
    their format is none this reads (a phone's .heic, a .mov, a camera's raw file), by kind; "" when there
    are none. Other files (a README, metadata.jsonl) are not photos, and not counted."""
    kinds: collections.Counter[str] = collections.Counter()
    for arg in map(Path, args):
        if arg.is_dir():
            kinds.update(p.suffix.lower() for p in arg.rglob("*") if _unread_media(p))
    if not kinds:
        return ""
    n = sum(kinds.values())
    listed = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"note: skipped {n} file{'s' if n > 1 else ''} in a format this does not read ({listed}); it reads "
            f"{' '.join(sorted(IMAGE_SUFFIXES))}: convert {'them' if n > 1 else 'it'} to one of those to caption "
            f"{'them' if n > 1 else 'it'}")


def _unread_media(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or path.name.startswith(".") or not path.is_file():
        return False
    kind = mimetypes.guess_type(path.name)[0] or ""
    return kind.startswith(("image/", "video/")) or suffix in RAW_SUFFIXES


def check_output_path(output: str) -> Path:
    """`output` as a Path if the captions can be written there (checked before any captioning)."""
    out = Path(output)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise CaptionerError(f"{out}: --output writes JSON lines (.jsonl) or CSV (.csv); name the file by one of "
                             "those suffixes")
    if out.is_dir():
        raise CaptionerError(f"{out}: is a folder; --output takes a file name")
    if not out.parent.is_dir():
        raise CaptionerError(f"{out.parent}: no such folder for the --output file")
    return out


def write_output(out: Path, rows: list[dict]) -> None:
    """The captions as JSON lines (one object per image: path, caption, n_best) or CSV (path, rank, caption,
    score: one row per n-best caption), written atomically."""
    if out.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["path", "rank", "caption", "score"])
        for row in rows:
            for rank, hyp in enumerate(row["n_best"], start=1):
                writer.writerow([row["path"], rank, hyp["caption"], hyp["score"]])
        text = buffer.getvalue()
    atomic_write(out, lambda f: f.write(text.encode("utf-8", "surrogateescape")))  # file names as on disk


class _NoBar:
    """What `progress` gives where no bar is shown: lines go straight to their stream."""

    def update(self, n: int) -> None:
        pass

    @staticmethod
    def write(line: str, file=None) -> None:
        print(line, file=file or sys.stdout)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int):
    """A tqdm bar on stderr for more than one image where stderr is a terminal (as feature extraction shows
    one); elsewhere nothing, and tqdm is not even imported."""
    if total < 2 or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True)
