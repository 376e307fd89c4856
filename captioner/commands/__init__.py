"""What each `captioner` subcommand does once its arguments are parsed (captioner.cli parses them; its
decoding_of turns the shared decoding options into one captioner.model.decoding.Decoding)."""

from __future__ import annotations

import argparse

from captioner.cli import decoding_of


def guards_of(args: argparse.Namespace):
    """The decode-time guards that cli's --no-repeat-ngram, --repeat-guard and --end-guard describe."""
    return decoding_of(args).guards


def rerank_of(args: argparse.Namespace):
    """The consensus reranking that cli's --rerank, --rerank-beam, --rerank-weight and --rerank-k describe."""
    return decoding_of(args).rerank
