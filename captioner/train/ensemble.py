"""Training an ensemble by one command: the config's members, one after another, in one run directory.

    captioner train --config flickr8k-ensemble --data ../shared/datasets/flickr8k
    captioner train --resume runs/flickr8k-ensemble        # continues with the member it was training

With `ensemble.members = M`, member i (1..M) is the config with train.seed + i - 1 and nothing else
changed, trained by `fit` into RUN_DIR/member-i/ (a whole run directory of its own: config.toml, log.jsonl,
best.pt, last.pt). Member 1 is therefore exactly the run the config gives without the ensemble section. The
members share the feature cache, so only the first extracts. When the last one has finished, the members'
best checkpoints are decoded together on dev (greedy, the next-word probabilities averaged, as
captioner.model.ensemble does at caption time) and RUN_DIR/ensemble.json records the members, their dev
scores, the ensemble's and the wall-clock seconds of each member.

A run directory of an ensemble names its members wherever a checkpoint is taken (`captioner evaluate
--checkpoint RUN_DIR`, `captioner export RUN_DIR OUT.pt`): see captioner.checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner import checkpoint
from captioner.atomic import atomic_write_text
from captioner.config import Config, EnsembleConfig, load_config, to_toml
from captioner.device import resolve_device
from captioner.errors import CaptionerError
from captioner.precision import resolve as resolve_precision
from captioner.train.loop import fit
from captioner.run_layout import BEST, LAST, member_dir as member_dir_of
from captioner.train.sources import prepare_data
from captioner.train.validate import evaluate

log = logging.getLogger("captioner")

REPORT = "ensemble.json"


def member_config(cfg: Config, i: int) -> Config:
    """Member i (1-based) of an ensemble config: its own seed, trained as one model."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + i - 1),
                               ensemble=EnsembleConfig())


def is_ensemble_run(run_dir: Path) -> bool:
    """Whether `run_dir` was started by fit_ensemble (its config asks for several members)."""
    config = Path(run_dir) / "config.toml"
    return config.is_file() and not (Path(run_dir) / LAST).exists() and load_config(config).ensemble.members > 1


def fit_ensemble(cfg: Config | None, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train every member of `cfg` (see the module docstring); returns what ensemble.json records."""
    run_dir = Path(run_dir)
    if resume:
        if not is_ensemble_run(run_dir):
            raise CaptionerError(f"{run_dir}: not the run directory of an ensemble (no config.toml asking for "
                                 "several members)")
        cfg = load_config(run_dir / "config.toml")
    elif (run_dir / "config.toml").exists():
        raise CaptionerError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    assert cfg is not None
    M = cfg.ensemble.members
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    report = _read_report(run_dir)
    seconds = report.get("member_seconds", {})
    for i in range(1, M + 1):
        member_dir = member_dir_of(run_dir, i)
        member = member_config(cfg, i)
        started = (member_dir / LAST).is_file() or (member_dir / "config.toml").is_file()
        log.info("ensemble member %d of %d (train.seed %d): %s%s", i, M, member.train.seed, member_dir,
                 ", resumed" if started else "")
        t0 = time.perf_counter()
        fit(member if not started else None, member_dir, resume=started)
        seconds[str(i)] = round(seconds.get(str(i), 0.0) + time.perf_counter() - t0, 1)
        _write_report(run_dir, {**report, "member_seconds": seconds})
    report = {**report, "member_seconds": seconds, **_score(cfg, run_dir, M)}
    _write_report(run_dir, report)
    scores = report["val_greedy"]
    log.info("ensemble of %d members: dev greedy BLEU-4 %.2f, CIDEr %.2f (members: CIDEr %s); %s", M,
             scores["BLEU-4"], scores["CIDEr"],
             ", ".join(f"{m['val_greedy']['CIDEr']:.2f}" for m in report["members"]), run_dir / REPORT)
    return report


def _score(cfg: Config, run_dir: Path, M: int) -> dict[str, Any]:
    """The members' best checkpoints, one at a time and together, greedy on the dev split."""
    paths = [member_dir_of(run_dir, i) / BEST for i in range(1, M + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CaptionerError(f"{run_dir}: members without a best checkpoint: {', '.join(missing)}")
    loaded = [checkpoint.load_model(p) for p in paths]
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    data = prepare_data(cfg, loaded[0].vocab, precision=precision)
    array, rows = data.features.val_array(data.val, device)
    feats = torch.from_numpy(np.asarray(array[rows], dtype=np.float32))
    refs = [list(r.captions) for r in data.val]

    def greedy_scores(model: torch.nn.Module) -> dict[str, float]:
        metrics = evaluate(model.to(device), feats, refs, data.vocab, cfg.train.eval_max_len, device,
                           precision=precision)
        return {k: round(v, 4) for k, v in metrics.items()}

    members = [{"checkpoint": str(p), "epoch": m.checkpoint.get("epoch"), "val_greedy": greedy_scores(m.model)}
               for p, m in zip(paths, loaded)]
    together = checkpoint.ensemble_of(loaded, paths)
    return {"members": members, "val_greedy": greedy_scores(together.model)}


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_report(run_dir: Path, report: dict[str, Any]) -> None:
    atomic_write_text(run_dir / REPORT, json.dumps(report, indent=2) + "\n")
