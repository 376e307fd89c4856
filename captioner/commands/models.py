"""`captioner models`: the shipped models (captioner.pretrained), what each is and how it was made."""

from __future__ import annotations

import argparse
import json

from captioner.pretrained import DEFAULT, Pretrained, get_pretrained, list_pretrained


def run(args: argparse.Namespace) -> int:
    models = [get_pretrained(name) for name in list_pretrained()]
    if args.json:
        print(json.dumps([{**m.to_dict(), "default": m.name == DEFAULT} for m in models], indent=2))
        return 0
    print("\n\n".join(describe(m) for m in models))
    print(f"\n`--checkpoint NAME` (or Captioner.from_pretrained(NAME)) picks one; without it: {DEFAULT}. Scores x100 "
          "on the Flickr8k dev split, beam 3, the model's own beam (no reranking, no open vocabulary).")
    return 0


def describe(model: Pretrained) -> str:
    """A few aligned lines: the name, then one line per field."""
    scores = "  ".join(f"{k} {v:.1f}" for k, v in model.dev_scores) or "not measured alone"
    minutes = f"{model.train_minutes:.0f} min on a 2-core CPU: " if model.train_minutes else ""
    rows = [("members", ", ".join(model.members)), ("encoder", model.encoder), ("decoder", model.decoder),
            ("data", model.data), ("dev", scores), ("size", f"{model.size_bytes() / 1e6:.1f} MB"),
            ("trained", f"{minutes}{model.train_command}"), ("licence", model.licence)]
    head = f"{model.name}{' (default)' if model.name == DEFAULT else ''}: {model.description}"
    return "\n".join([head, *(f"  {key:<8} {value}" for key, value in rows)])
