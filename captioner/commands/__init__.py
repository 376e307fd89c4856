"""What each `captioner` subcommand does once its arguments are parsed (captioner.cli parses them)."""

from __future__ import annotations

import argparse


def guards_of(args: argparse.Namespace):
    """The decode-time guards that cli's --no-repeat-ngram, --repeat-guard and --end-guard describe."""
    from captioner.model.constraints import Guards

    return Guards(no_repeat_ngram=args.no_repeat_ngram, repeat_word=args.repeat_guard, end=args.end_guard)


def rerank_of(args: argparse.Namespace):
    """The consensus reranking that cli's --rerank, --rerank-weight and --rerank-k describe."""
    from captioner.model.rerank import Rerank

    return Rerank(n_best=args.rerank, weight=args.rerank_weight, k=args.rerank_k, beam=args.rerank_beam).check()
