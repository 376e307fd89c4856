"""Does fine-tuning pay? The shipped model as it is against fine-tuned variants on COCO photos it never saw.

    python3 benchmarks/finetune_coco.py --data ../shared/datasets/coco-dev [--seeds 0,1,2]
        [--variants finetune,...] [--runs runs/finetune-coco] [--cache cache] [--holdout 0.2]

For each holdout seed, the dataset's training images are split as training would split them (data.holdout of
them held out as dev, captioner/data/holdout.py), and on the held-out slice, beam 3 with the default guards:
- the shipped ensemble (the default captioner) and `flickr8k` (its first member) as they are;
- each variant: `captioner train --config ... --init-from ... --data DATA` into RUNS/<settings>/seed-S/<model>
  (a run directory that already holds a finished run is reused: delete it to train again), then its best
  checkpoint (or the ensemble of its members' best checkpoints).
It prints, per variant, CIDEr and BLEU-4 on each seed and their means, how many times the captions of the
held-out photos use a word the shipped vocabulary lacks and how many of those uses are correct (the word is in
one of that photo's reference captions), the training wall-clock seconds and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner import checkpoint
from captioner.data import holdout
from captioner.data.records import load_records
from captioner.data.vocab import tokenize
from captioner.eval.metrics import score_captions
from captioner.inference import Captioner
from captioner.precision import FP32
from captioner.vision.features import extract_features

# name -> (the members' --init-from models, the --config, --set overrides). One --init-from: one run; several:
# one run each (the same settings), decoded together as an ensemble.
VARIANTS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "finetune": (("flickr8k",), "finetune", ()),
    "finetune-members": (("flickr8k", "flickr8k-2", "flickr8k-3"), "finetune", ()),
    "finetune-boost-10": (("flickr8k",), "finetune", ("train.new_words_lr_scale=10",)),
    "finetune-mean-rows": (("flickr8k",), "finetune", ("train.new_words=mean",)),
    "finetune-no-new-words": (("flickr8k",), "finetune", ("train.new_words=off",)),
    "finetune-boost-30": (("flickr8k",), "finetune", ("train.new_words_lr_scale=30",)),
    "finetune-lr1e-4": (("flickr8k",), "finetune", ("train.lr=1e-4",)),
    "finetune-lr5e-4": (("flickr8k",), "finetune", ("train.lr=5e-4",)),
    "finetune-3-epochs": (("flickr8k",), "finetune", ("train.epochs=3",)),
    "finetune-10-epochs": (("flickr8k",), "finetune", ("train.epochs=10",)),
    "finetune-scst": (("flickr8k",), "finetune", ("train.scst_epochs=3",)),
    "tiny": (("flickr8k",), "tiny", ()),  # the recipe the README used to show
}
SHIPPED = {"shipped ensemble": [], "shipped flickr8k": ["flickr8k"]}


def train_command(data: Path, init_from: str, config: str, sets: tuple[str, ...], seed: int, fraction: float,
                  cache: Path, run_dir: Path) -> list[str]:
    sets = (f"data.holdout={fraction:g}", f"data.holdout_seed={seed}", f"data.cache_dir={cache}", *sets)
    return ["captioner", "train", "--config", config, "--init-from", init_from, "--data", str(data),
            *(x for s in sets for x in ("--set", s)), "--run-dir", str(run_dir)]


def train(cmd: list[str], run_dir: Path) -> dict[str, float]:
    """Run `cmd` (unless run_dir already holds a finished run): its wall-clock and CPU seconds (user + system,
    all threads: on a shared machine the wall clock depends on the neighbours, the CPU time less)."""
    record = run_dir / "bench.json"
    if (run_dir / "best.pt").is_file() and record.is_file():
        return json.loads(record.read_text())
    if run_dir.exists():
        sys.exit(f"{run_dir}: an unfinished run; delete it and run again")
    print("$", shlex.join(cmd), flush=True)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    # `python -m captioner` runs this checkout's code (PYTHONPATH), as `captioner` would once installed.
    subprocess.run([sys.executable, "-m", "captioner", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"train_seconds": round(time.perf_counter() - t0, 1),
              "cpu_seconds": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1),
              "command": shlex.join(cmd)}
    record.write_text(json.dumps(result))
    return result


def evaluate(paths: list, records, cache: Path, shipped_words: set[str]) -> dict[str, float]:
    """Beam 3 (default guards) on `records`: CIDEr, BLEU-4, and the uses of words the shipped model lacks."""
    cap = Captioner.from_checkpoints(paths, torch.device("cpu"), FP32)
    store = extract_features(cap.encoder, [r.image for r in records], cache, progress=False, precision=FP32)
    hyps = cap.caption_features(store.get([r.image for r in records]), beam_size=3)
    captions = {str(r.image): cap.text(h[0]) for r, h in zip(records, hyps)}
    refs = {str(r.image): list(r.captions) for r in records}
    scores = score_captions(refs, captions, meteor=False).totals
    used = correct = 0
    new_words: set[str] = set()
    for key, caption in captions.items():
        ref_words = {w for ref in refs[key] for w in tokenize(ref)}
        for word in set(tokenize(caption)) - shipped_words:
            used += 1
            correct += word in ref_words
            new_words.add(word)
    return {"CIDEr": scores["CIDEr"], "BLEU-4": scores["BLEU-4"], "new_used": used, "new_correct": correct,
            "new_distinct": len(new_words), "examples": sorted(new_words)[:8]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/coco-dev"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="finetune", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--runs", type=Path, default=Path("runs/finetune-coco"))
    p.add_argument("--cache", type=Path, default=Path("cache"))
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]} (known: {', '.join(VARIANTS)})")
    data, cache = args.data.resolve(), args.cache.resolve()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    shipped_words = set(checkpoint.load_model(checkpoint.default_checkpoint()).vocab.words)
    all_records = load_records(data)

    rows: dict[str, dict] = {}
    for seed in seeds:
        held = holdout.choose(all_records, data, args.holdout, seed)
        records = [r for r in held.apply(all_records, data)[0] if r.split == "val"]
        for name, paths in SHIPPED.items():
            rows.setdefault(name, {"seeds": {}, "seconds": [], "cpu": [], "command": "(as shipped)"})["seeds"][seed] = \
                evaluate(paths, records, cache, shipped_words)
        for name in variants:
            inits, config, sets = VARIANTS[name]
            best, seconds, cpu, cmds = [], 0.0, 0.0, []
            for init in inits:
                # Named by its settings, so variants that share a run (a member of an ensemble) train it once.
                run_dir = (args.runs / "+".join((config, *sets)) / f"seed-{seed}" / init).resolve()
                cmd = train_command(data, init, config, sets, seed, args.holdout, cache, run_dir)
                timing = train(cmd, run_dir)
                seconds += timing["train_seconds"]
                cpu += timing.get("cpu_seconds", float("nan"))
                recorded = checkpoint.read(run_dir / "best.pt").get("holdout")
                assert recorded is not None and set(recorded["images"]) == set(held.images), run_dir
                best.append(run_dir / "best.pt")
                cmds.append(shlex.join(cmd[:-2]))  # without --run-dir
            row = rows.setdefault(name, {"seeds": {}, "seconds": [], "cpu": [], "command": " ; ".join(cmds)})
            row["seeds"][seed] = evaluate(best, records, cache, shipped_words)
            row["seconds"].append(seconds)
            row["cpu"].append(cpu)
            print(f"seed {seed} {name}: {row['seeds'][seed]}", flush=True)

    print(f"\n{data.name}: {len(held.images)} held-out photos per seed (data.holdout {args.holdout:g}), "
          f"seeds {', '.join(map(str, seeds))}, beam 3, default guards\n")
    head = ["model", *(f"CIDEr s{s}" for s in seeds), "CIDEr mean", "BLEU-4 mean", "new words used/correct",
            "train s (wall)", "train s (CPU)", "command"]
    print(" | ".join(head))
    for name, row in rows.items():
        per = [row["seeds"][s] for s in seeds]
        mean = lambda k: sum(x[k] for x in per) / len(per)  # noqa: E731
        secs = f"{sum(row['seconds']) / len(row['seconds']):.0f}" if row["seconds"] else "-"
        measured = [c for c in row["cpu"] if c == c]  # runs timed before CPU time was recorded are NaN
        cpu = f"{sum(measured) / len(measured):.0f}" if measured else "-"
        print(" | ".join([name, *(f"{x['CIDEr']:.1f}" for x in per), f"{mean('CIDEr'):.1f}",
                          f"{mean('BLEU-4'):.1f}",
                          f"{sum(x['new_used'] for x in per)}/{sum(x['new_correct'] for x in per)}",
                          secs, cpu, row["command"]]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
