"""Look inside the decoder: gradient flow through time, and units that track properties of the words.

    python analyze.py gradient-flow [--checkpoint CKPT] [--cells rnn lstm gru] [--steps 50] [--hidden 128]
                                    [--spectral-radius R [R ...]] [--out grad_flow.png]
    python analyze.py cells [--checkpoint CKPT] IMAGE [IMAGE|DIR ...] [--out DIR] [--n-best 10]
    python analyze.py runs RUN_DIR [RUN_DIR ...] [--metric CIDEr] [--eval eval-val-beam3.json]

gradient-flow: fresh decoders of each cell (or the checkpoint's model), a loss on the last of --steps steps,
||dL/dh_t|| at every step; with --spectral-radius, copies whose W_hh gate blocks are rescaled to that
largest singular value (above 1 they run with tiny inputs, tanh's linear regime). Prints the spectral
norms and the decay factor per step, saves the plot. See docs/rnn-lessons.md.

cells: captions the images (greedy shown, beam n-best as the ranking corpus) with the checkpoint (default:
the shipped model), ranks the top layer's units by correlation with word position, noun phrases, colour
words and "after a determiner"; writes DIR/cells.png (units x words) and DIR/cells.html.
"""

import argparse
from pathlib import Path

import torch

from captioner import curves, gradient_flow, interpret
from captioner.checkpoint import load_model
from captioner.cli import run_main, setup_logging
from captioner.config import CELLS
from captioner.errors import CaptionerError
from captioner.images import find_images, load_image
from captioner.inference import Captioner


def gradient_flow_cmd(args) -> int:
    if args.steps < 2:
        raise CaptionerError(f"--steps must be at least 2, got {args.steps}")
    if any(r <= 0 for r in args.spectral_radius or []):
        raise CaptionerError("--spectral-radius values must be positive")
    if args.checkpoint:
        model = load_model(args.checkpoint).model
        models = [(f"{model.cfg.cell} (checkpoint)", model)]
    else:
        models = [(f"{cell} (init)", gradient_flow.fresh_model(cell, args.hidden)) for cell in args.cells]
    flows = gradient_flow.lesson(models, steps=args.steps, sigmas=args.spectral_radius)
    print(gradient_flow.report(flows))
    print(f"decay/step: geometric mean of ||dL/dh_(t-1)|| / ||dL/dh_t|| over {args.steps} steps "
          "(<1 vanishes, >1 explodes); 'linear' rows use inputs scaled by "
          f"{gradient_flow.linear_regime_scale(max(args.spectral_radius or [1]), args.steps):.1e}")
    path = gradient_flow.plot(flows, args.out)
    print(f"wrote {path}")
    return 0


def cells_cmd(args) -> int:
    paths = find_images(args.images)
    captioner = Captioner.from_checkpoint(args.checkpoint)
    encoder = captioner.encoder
    with torch.no_grad():
        features = encoder(torch.stack([encoder.preprocess(load_image(p)) for p in paths]))  # (N, F)
    report = interpret.analyse(captioner.model, captioner.vocab, features, n_best=args.n_best,
                               top=args.top)
    print(interpret.summary(report))
    out = Path(args.out)
    print(f"wrote {interpret.write_heatmap(report, out / 'cells.png')}")
    print(f"wrote {interpret.write_html(report, out / 'cells.html')}")
    return 0


def runs_cmd(args) -> int:
    print(curves.runs_table([Path(d) for d in args.run_dirs], metric=args.metric, eval_name=args.eval))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gradient-flow", help="||dL/dh_t|| against the distance from the loss")
    g.add_argument("--checkpoint", help="analyse this trained model instead of fresh ones")
    g.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS), help="fresh models' cells")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--hidden", type=int, default=128, help="fresh models' hidden (and embedding) size")
    g.add_argument("--spectral-radius", type=float, nargs="+", metavar="R",
                   help="also run copies with every W_hh gate block rescaled to largest singular value R")
    g.add_argument("--out", default="grad_flow.png")
    g.set_defaults(run=gradient_flow_cmd)

    c = sub.add_parser("cells", help="hidden units that track word position, noun phrases, colours")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    c.add_argument("--checkpoint", help="default: the shipped model")
    c.add_argument("--out", default="cells", help="folder for cells.png and cells.html")
    c.add_argument("--n-best", type=int, default=10, help="beam captions per image in the ranking corpus")
    c.add_argument("--top", type=int, default=2, help="units shown per property")
    c.set_defaults(run=cells_cmd)

    r = sub.add_parser("runs", help="a markdown table of training runs: best epoch and its val scores")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--metric", default="CIDEr", help="which val metric picks each run's best epoch")
    r.add_argument("--eval", metavar="NAME", help="show the totals of each run's evaluate.py --json file NAME "
                                                  "(e.g. eval-val-beam3.json) instead of the log's greedy scores")
    r.set_defaults(run=runs_cmd)

    args = parser.parse_args()
    setup_logging(args.verbose)
    return args.run(args)


if __name__ == "__main__":
    run_main(main)
