"""The `captioner` command: caption, models, train, evaluate, analyze, export, serve.

    captioner caption photo.jpg                     # python -m captioner ... is the same
    captioner train --config flickr8k --data ../shared/datasets/flickr8k

Every argument is parsed here, before anything heavy is imported: `captioner --help` and a mistyped
option answer at once, and torch loads only when a command runs (each lives in captioner.commands.NAME
as `run(args) -> exit status`). A CaptionerError (something the user can fix) is printed as
`error: ...` with exit status 2, never as a traceback; Ctrl-C exits with 130.

As the process's own entry (the console script, `python -m captioner`, the train.py-style wrappers) a
command that trains first re-executes itself once with a faster memory allocator for training's large
tensors, unless the user chose one (captioner.allocator; CAPTIONER_ALLOCATOR=system turns it off); the
others (captioning a photo) start once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from captioner import __version__, allocator, choices
from captioner.errors import CaptionerError



class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks; every option's help ends with its default.

    A help text that states its default itself ("(default: ...)") is left as written, and an option whose
    default is None (not set unless given) gets no "(default: None)".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except CaptionerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Which model decodes, on what, in which precision: `caption`, `evaluate` and `serve` share these."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", action="append", default=[],
                   help="a checkpoint from `captioner train` or a shipped model's name (flickr8k: the single "
                        "GRU, fastest); give it more than once for the ensemble of those models (default: the "
                        "shipped ensemble of flickr8k, flickr8k-2 and flickr8k-3)")
    g.add_argument("--device", default="auto", choices=choices.DEVICES,
                   help="where the model runs (auto: a GPU when there is one)")
    g.add_argument("--precision", choices=choices.PRECISIONS, default=choices.DEFAULT_PRECISION,
                   help="matrix multiplies in bf16 or fp32; auto: bf16 where the CPU (AVX512-BF16, AMX) or GPU "
                        "has native bf16, fp32 elsewhere")


# The decoding options: each sets one field of captioner.model.decoding.Decoding ("guards.end": a field of
# its Guards), whose default it shows (that module imports no torch). A new decoding setting is a field
# there and one row here. The guards' defaults, the measured best: --no-repeat-ngram 0 --no-repeat-guard
# --no-end-guard is plain search.
DECODING_OPTIONS = [
    ("--beam-size", "beam_size", {"type": int, "help": "beam width (1: greedy)"}),
    ("--n-best", "n_best", {"type": int, "help": "captions per image, best first (at most the beam size)"}),
    ("--length-penalty", "length_penalty",
     {"type": float, "help": "beam search's GNMT length-normalisation alpha (0: summed log-probability)"}),
    ("--max-len", "max_len", {"type": int, "help": "longest caption, in words"}),
    ("--no-repeat-ngram", "guards.no_repeat_ngram",
     {"type": int, "metavar": "N", "help": "no n-gram of N words twice in a caption, as Hugging Face's "
                                           "no_repeat_ngram_size (0: off)"}),
    ("--repeat-guard", "guards.repeat_word",
     {"action": argparse.BooleanOptionalAction,
      "help": "never the same word twice in a row (\"is is\"), which --no-repeat-ngram 2 lets through once"}),
    ("--end-guard", "guards.end",
     {"action": argparse.BooleanOptionalAction,
      "help": "never end a caption on a determiner, preposition, conjunction or dangling adjective"}),
    ("--rerank", "rerank.n_best",
     {"type": int, "metavar": "N", "help": "rerank the beam's N best by consensus with the captions of the "
                                           "nearest training images (0: off, the beam's own order); needs the "
                                           "model's neighbour index"}),
    ("--rerank-beam", "rerank.beam",
     {"type": int, "metavar": "B", "help": "the beam width the reranked candidates come from (the beam widens "
                                           "to it)"}),
    ("--rerank-weight", "rerank.weight",
     {"type": float, "metavar": "W", "help": "each candidate scores its log-probability per word + W x its "
                                             "consensus (CIDEr-D)"}),
    ("--rerank-k", "rerank.k", {"type": int, "metavar": "K", "help": "the nearest training images consulted"}),
    ("--open-vocab", "open_vocab.enabled",
     {"action": argparse.BooleanOptionalAction,
      "help": "use the encoder's ImageNet tags: they may name what the caption vocabulary lacks and check what "
              "it says (--no-open-vocab: the caption vocabulary alone)"}),
    ("--tag-copy", "open_vocab.copy",
     {"type": float, "metavar": "W", "help": "share of the decoder's object-word probability given to the "
                                             "photo's tags (0: off)"}),
    ("--tag-must", "open_vocab.must",
     {"type": float, "metavar": "P", "help": "a tag at least P probable must be said, by constrained beam "
                                             "search (0: off)"}),
    ("--tag-margin", "open_vocab.margin",
     {"type": float, "metavar": "M", "help": "keep the caption that says the required tag only if its "
                                             "log-probability per word is at most M below the plain caption's "
                                             "(0: always)"}),
    ("--tag-floor", "open_vocab.floor",
     {"type": float, "metavar": "F", "help": "\"dog\" (and the other checked words) with a tag below F is "
                                             "penalised by tag / F (0: off)"}),
]


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def add_decoding_options(p: argparse.ArgumentParser, n_best: bool = True) -> None:
    """How captions are decoded: the options `caption`, `evaluate` and `serve` share, turned into a Decoding
    by decoding_of. n_best: offer --n-best (evaluate scores the best caption alone, so it has none)."""
    from captioner.model.decoding import Decoding

    defaults = Decoding()
    g = p.add_argument_group("decoding")
    for option, field, settings in DECODING_OPTIONS:
        if option == "--n-best" and not n_best:
            continue
        default = defaults
        for part in field.split("."):
            default = getattr(default, part)
        g.add_argument(option, default=default, **settings)


def decoding_of(args: argparse.Namespace):
    """The Decoding that add_decoding_options' arguments describe, checked: a bad value is a CaptionerError
    naming the option (`--beam-size must be at least 1, got 0`). An option the command does not offer
    keeps its default. Imports no torch."""
    from captioner.model.decoding import Decoding

    defaults = Decoding()
    top: dict = {}
    parts: dict[str, dict] = {}  # "guards" -> the Guards fields given
    for option, field, _ in DECODING_OPTIONS:
        if not hasattr(args, _dest(option)):
            continue
        value = getattr(args, _dest(option))
        if "." in field:
            outer, inner = field.split(".")
            parts.setdefault(outer, {})[inner] = value
        else:
            top[field] = value
    for outer, values in parts.items():  # Guards(...), Rerank(...): each checks itself
        top[outer] = type(getattr(defaults, outer))(**values)
    return Decoding.of(None, **top, named={field: option for option, field, _ in DECODING_OPTIONS})


def _caption(sub) -> None:
    p = sub.add_parser("caption", help="caption image files and folders", formatter_class=_Formatter,
                       description="""Caption images: prints `path<TAB>caption` per image (or, with --json, one JSON
list with the n-best captions and their scores). With --n-best K above 1 and no --json, each
image gets K lines `path<TAB>score<TAB>caption`, best first. --html writes a page of thumbnails
with their captions. A file that cannot be read gets a one-line error on stderr and the rest are
still captioned; the exit status is 1 if any image failed.""")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    add_model_options(p)
    add_decoding_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON list with n-best captions and scores")
    p.add_argument("--html", metavar="OUT.html",
                   help="also write a gallery page: each image's thumbnail with its captions (thumbnails go "
                        "in OUT_files/ beside it)")
    p.add_argument("--output", metavar="FILE",
                   help="also write the captions to FILE, one row per image: JSON lines (.jsonl) or CSV (.csv) "
                        "by its suffix; written whole or not at all")
    p.add_argument("--batch-size", type=int, default=16, help="images through the CNN and the search at once")

    p.add_argument("--neighbours", type=int, default=0, metavar="N",
                   help="also show the captions of the N nearest training images (at most --rerank-k), the "
                        "examples the model's caption is closest to")
    p.add_argument("--min-confidence", type=float, default=None, metavar="T",
                   help="mark captions whose confidence (0..1) is under T: `?` before the caption, "
                        "\"low_confidence\": true in --json, and a count on stderr")


def _models(sub) -> None:
    p = sub.add_parser("models", help="list the shipped models", formatter_class=_Formatter,
                       description="""The models shipped inside the package, which `--checkpoint NAME` takes: their
members, encoder, decoder, dev scores, size, how they were trained and their licence
(captioner.list_pretrained() in Python).""")
    p.add_argument("--json", action="store_true", help="print them as one JSON list")


def _train(sub) -> None:
    p = sub.add_parser("train", help="train a captioner", formatter_class=_Formatter,
                       description="""Train a captioner from cached image features.

    captioner train --config flickr8k --data PATH [--set model.cell=gru ...] [--run-dir DIR]
    captioner train --init-from flickr8k --data PATH [--config tiny]
    captioner train --resume RUN_DIR""")
    p.add_argument("--config", help="a config name (flickr8k, tiny, levers/gru, ...) or a TOML file; "
                                    "defaults apply to what it leaves out")
    p.add_argument("--data", help="dataset root (sets data.root); the layout is detected")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--run-dir", help="where the config, log and checkpoints go (default: runs/<config name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh where the run directory holds a run: deletes that run's own files (config, "
                        "log, curves, checkpoints, its members' folders), nothing else in the folder")
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune: start from this model's weights, vocabulary and encoder (a checkpoint file, or "
                        "a shipped model's name: flickr8k); its architecture replaces the config's model section, "
                        "and without --config its own training config applies")


def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a captioner on a dataset split", formatter_class=_Formatter,
                       description="""Score a captioner on a dataset split exactly as the captioning papers do
(COCO caption evaluation): decodes every image of the split (from the feature cache when
present, extracting what is missing), prints BLEU-1..4, METEOR, ROUGE-L and CIDEr (x100) with
the number of images scored, and with --json writes the per-image captions, references and
scores plus the totals; with --html, a gallery page of every scored image with its caption,
references and scores, worst CIDEr first. Without --split it scores the test split when the
data has one, else val (and says so). On data without a val split (coco-mini, your own photos)
val is the slice of training images that --checkpoint held out as dev when it was trained.""")
    add_model_options(p)
    add_decoding_options(p, n_best=False)
    p.add_argument("--data", required=True, help="dataset root, any layout the readers know")
    p.add_argument("--format", default="auto", help="force the dataset format (auto: detected)")
    p.add_argument("--split", help="train, val (or dev), test (default: test when the data has one, else val); on "
                                   "data without val, val is the slice of training images the checkpoint held "
                                   "out as dev, and train the rest")
    p.add_argument("--cache-dir", default="cache", help="feature cache")
    p.add_argument("--limit", type=int, default=0, help="score only the split's first N images (0: all)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
    p.add_argument("--json", metavar="OUT", help="write per-image captions, references and scores here")
    p.add_argument("--html", metavar="OUT.html",
                   help="write a gallery page: thumbnails, captions, references, per-image BLEU-4 and CIDEr, "
                        "sortable (thumbnails go in OUT_files/ beside it)")


def _analyze(sub) -> None:
    p = sub.add_parser("analyze", help="look inside the decoder: gradient flow, interpretable cells, runs",
                       formatter_class=_Formatter, description="""Look inside the decoder.

gradient-flow: fresh decoders of each cell (or the checkpoint's model), a loss on the last of --steps
steps, ||dL/dh_t|| at every step; with --spectral-radius, copies whose W_hh gate blocks are rescaled to
that largest singular value (above 1 they run with tiny inputs, tanh's linear regime). Prints the
spectral norms and the decay factor per step, saves the plot. See docs/rnn-lessons.md.

cells: captions the images (greedy shown, beam n-best as the ranking corpus) with the checkpoint,
ranks the top layer's units by correlation with word position, noun phrases, colour words and "after
a determiner"; writes DIR/cells.png (units x words) and DIR/cells.html.

runs: a markdown table of training runs, each at its best epoch.""")
    cells = choices.CELLS
    what = p.add_subparsers(dest="analysis", required=True)
    g = what.add_parser("gradient-flow", help="||dL/dh_t|| against the distance from the loss",
                        formatter_class=_Formatter)
    g.add_argument("--checkpoint", help="analyse this trained model (a file or a shipped model's name) "
                                        "instead of fresh ones")
    g.add_argument("--cells", nargs="+", choices=cells, default=list(cells), help="fresh models' cells")
    g.add_argument("--steps", type=int, default=50, help="decoder steps; the loss is on the last one")
    g.add_argument("--hidden", type=int, default=128, help="fresh models' hidden (and embedding) size")
    g.add_argument("--spectral-radius", type=float, nargs="+", metavar="R",
                   help="also run copies with every W_hh gate block rescaled to largest singular value R")
    g.add_argument("--out", default="grad_flow.png", help="where the plot goes")
    c = what.add_parser("cells", help="hidden units that track word position, noun phrases, colours",
                        formatter_class=_Formatter)
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    c.add_argument("--checkpoint", help="one model: a file or a shipped model's name (default: flickr8k, "
                                        "the single shipped GRU)")
    c.add_argument("--out", default="cells", help="folder for cells.png and cells.html")
    c.add_argument("--n-best", type=int, default=10, help="beam captions per image in the ranking corpus")
    c.add_argument("--top", type=int, default=2, help="units shown per property")
    r = what.add_parser("runs", help="a markdown table of training runs: best epoch and its val scores",
                        formatter_class=_Formatter)
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--metric", default="CIDEr", help="which val metric picks each run's best epoch")
    r.add_argument("--eval", metavar="NAME", help="show the totals of each run's `evaluate --json` file NAME "
                                                  "(e.g. eval-val-beam3.json) instead of the log's greedy scores")


def _export(sub) -> None:
    p = sub.add_parser("export", help="a small shippable float16 model from a training checkpoint",
                       formatter_class=_Formatter, description="""Turn a training checkpoint into a small shippable
one: float16 weights, no optimizer state. The exported file still rebuilds itself (model config,
vocabulary, encoder spec) and records where it came from: the resolved training config, the
epoch, and the dev metrics it was selected on.""")
    p.add_argument("src", help="a checkpoint written by `captioner train` (best.pt or last.pt), or the run "
                               "directory of an ensemble (ensemble.members > 1): each member's best.pt")
    p.add_argument("dst", help="where to write the float16 model; an ensemble's member i > 1 goes beside it, "
                               "with -i before the suffix (model.pt, model-2.pt, ...)")


def _serve(sub) -> None:
    p = sub.add_parser("serve", help="caption photos from a browser or over HTTP", formatter_class=_Formatter,
                       description="""Serve the captioner over HTTP (needs the serve extra: pip install 'captioner[serve]').

    GET  /          a page to drop or pick photos and see their captions
    POST /caption   multipart field `image`, or `url` (an http(s) address the server downloads);
                    optional fields beam_size, n_best (default: --beam-size, --n-best)
                    -> {"caption": ..., "confidence": ..., "n_best": [{"caption": ..., "score": ...,
                        "consensus": ..., "confidence": ...}, ...]} (confidence: with a neighbour index)
    GET  /health    {"status": "ok", ...}

The model is loaded once; requests that arrive together are captioned in one batch (up to
--max-batch images, waiting at most --max-wait-ms for more). Bad uploads get a 4xx answer with
{"error": ...}; nothing is written to disk. Memory is bounded: a full queue answers 503 with
Retry-After. Only requests naming this server (Host) from its own page or no page at all (Origin) are
served: --allow-host and --allow-origin add others.""")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    add_model_options(p)
    add_decoding_options(p)  # a request's decoding; its form may ask for another beam_size and n_best
    p.add_argument("--max-batch", type=int, default=16, help="most images captioned in one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others (0: no batching)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest upload accepted, in megabytes; larger ones are refused unread")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for the model (0: the cores this process may use)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most decoded images waiting for a batch; past it requests get 503 with Retry-After")
    p.add_argument("--max-connections", type=int, default=64,
                   help="most open connections and requests at once (more get 503)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a client may take to send a request's headers, and again its body")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://example.com) whose pages may use the server; repeatable")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name the server may be reached by besides 127.0.0.1, localhost and --host "
                        "(needed with --host 0.0.0.0: the machine's name or address); repeatable")


COMMANDS = {"caption": _caption, "models": _models, "train": _train, "evaluate": _evaluate, "analyze": _analyze, "export": _export, "serve": _serve}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", formatter_class=_Formatter,
                                     description="Image captioning: a pretrained CNN encodes the photo, an RNN "
                                                 "that sees it at every step writes the caption.")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say more: the precision each command runs in, the allocator, debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None, entry: bool | None = None) -> None:
    """Parse `argv` (default: the process's arguments), then import and run the command.

    `entry`: this call starts the process (default: when argv is None), so it may re-execute the process
    with the chosen allocator first; a call from other code (a test, a notebook) never does.
    """
    args = build_parser().parse_args(argv)
    if args.command in allocator.COMMANDS and (entry if entry is not None else argv is None):
        allocator.reexec()
    setup_logging(args.verbose)
    logging.getLogger("captioner").debug("allocator: %s", allocator.describe())
    module = importlib.import_module(f"captioner.commands.{args.command}")
    run_main(lambda: module.run(args))
