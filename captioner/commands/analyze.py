"""`captioner analyze gradient-flow | cells | runs`: look inside the decoder and compare runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from captioner.analysis import curves, gradient_flow, interpret
from captioner import pretrained
from captioner.checkpoint import load_model
from captioner.errors import CaptionerError
from captioner.inference import Captioner
from captioner.vision.images import find_images, load_image


def gradient_flow_cmd(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise CaptionerError(f"--steps must be at least 2, got {args.steps}")
    if any(r <= 0 for r in args.spectral_radius or []):
        raise CaptionerError("--spectral-radius values must be positive")
    if args.checkpoint:
        model = load_model(pretrained.resolve_one(args.checkpoint)).model
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


def cells_cmd(args: argparse.Namespace) -> int:
    paths = find_images(args.images)
    captioner = Captioner.from_checkpoint(args.checkpoint or pretrained.SINGLE)  # one decoder to look inside
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


def runs_cmd(args: argparse.Namespace) -> int:
    print(curves.runs_table([Path(d) for d in args.run_dirs], metric=args.metric, eval_name=args.eval))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"gradient-flow": gradient_flow_cmd, "cells": cells_cmd, "runs": runs_cmd}[args.analysis](args)
