"""The two phases of training, one interface: cross-entropy (teacher forcing), then self-critical.

`fit` runs epochs 0..E-1 of `XEPhase` and then epochs E..E+S-1 of `ScstPhase`, asking each for one epoch at a
time. A phase gets everything it needs in a `Trainer` (the model, the optimizer, the data) and returns
what the epoch did as an `EpochResult`; the loop around it (evaluation, checkpoints, patience, resume) is the
same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from captioner import checkpoint
from captioner.config import Config, TrainConfig
from captioner.data.dataset import BucketBatchSampler, CaptionDataset
from captioner.data.vocab import Vocabulary
from captioner.distributed import Dist
from captioner.model.decoder import CaptionDecoder
from captioner.precision import Precision
from captioner.train import scst, step as train_step
from captioner.train.sources import FeatureSource, Prepared


@dataclass
class Trainer:
    """What the phases share: built once by `fit`, changed only through its `optimizer` and `step`."""

    cfg: Config
    data: Prepared
    model: CaptionDecoder  # the decoder itself (checkpoints save it)
    trained: torch.nn.Module  # what the XE step calls: the decoder, or encoder + decoder, maybe DDP-wrapped
    groups: list[dict[str, Any]]  # the optimizer's parameter groups
    optimizer: torch.optim.Optimizer
    train_set: CaptionDataset
    device: torch.device
    dist: Dist
    best_path: Path  # the run's best checkpoint, where SCST starts from
    precision: Precision  # bf16 or fp32 matrix multiplies (captioner.precision)
    step: int = 0
    total_epochs: int = 0
    _reward_data: scst.RewardData | None = field(default=None, repr=False)

    @property
    def vocab(self) -> Vocabulary:
        return self.data.vocab

    @property
    def source(self) -> FeatureSource:
        return self.data.features

    def reward_data(self) -> scst.RewardData:
        """The training captions as self-critical training's reward reads them, gathered on first use."""
        if self._reward_data is None:
            train = self.data.train
            self._reward_data = scst.RewardData([r.image for r in train], self.source.rows(train),
                                                [list(r.captions) for r in train])
        return self._reward_data

    def steps_per_epoch(self) -> int:
        sampler = BucketBatchSampler(self.train_set.lengths, self.cfg.train.batch_size, torch.Generator(),
                                     world=self.dist.world)
        return len(sampler)


@dataclass
class EpochResult:
    loss: float  # mean per-token training loss
    log: dict[str, Any]  # what the epoch's log line adds: phase, lr, rewards


class Phase(Protocol):
    name: str

    def patience(self, tc: TrainConfig) -> int:
        """Epochs without a better dev score before the phase ends early (0: it runs all its epochs)."""

    def begin(self, trainer: Trainer) -> None:
        """Called when the phase's first epoch is about to run (not when a run resumes inside it)."""

    def run_epoch(self, trainer: Trainer, epoch: int, shuffle: torch.Generator) -> EpochResult:
        """Train one epoch; advances trainer.step."""


class XEPhase:
    """Teacher-forced cross-entropy over every caption, in length buckets (captioner.train.step)."""

    name = "xe"

    def patience(self, tc: TrainConfig) -> int:
        return tc.patience

    def begin(self, trainer: Trainer) -> None:
        pass  # the optimizer `fit` built is this phase's

    def run_epoch(self, trainer: Trainer, epoch: int, shuffle: torch.Generator) -> EpochResult:
        tc, dist = trainer.cfg.train, trainer.dist
        total_steps = trainer.steps_per_epoch() * tc.epochs
        sampler = BucketBatchSampler(trainer.train_set.lengths, tc.batch_size, shuffle, dist.rank, dist.world)
        loader = DataLoader(trainer.train_set, batch_sampler=sampler, pin_memory=trainer.device.type == "cuda",
                            collate_fn=trainer.source.collate(trainer.train_set, trainer.vocab.pad_id))
        loss, trainer.step = train_step.train_one_epoch(
            trainer.trained, loader, trainer.optimizer, tc, trainer.step, total_steps, trainer.device,
            trainer.vocab.pad_id, desc=f"epoch {epoch + 1}/{trainer.total_epochs}", dist=dist,
            precision=trainer.precision)
        return EpochResult(loss, {"phase": self.name, "lr": train_step.lr_at(trainer.step - 1, tc, total_steps)})


class ScstPhase:
    """Self-critical sequence training on the CIDEr-D reward (captioner.train.scst), from the best or the last
    XE model (train.scst_start)."""

    name = "scst"

    def patience(self, tc: TrainConfig) -> int:
        return tc.scst_patience

    def begin(self, trainer: Trainer) -> None:
        tc = trainer.cfg.train
        if tc.scst_start == "best" and trainer.best_path.is_file():  # the best cross-entropy model so far
            best = checkpoint.load_model(trainer.best_path)
            checkpoint.load_state(trainer.model, best.model.state_dict(), trainer.best_path)
        # else the model as the last cross-entropy epoch left it; either way with a fresh optimizer
        trainer.optimizer = torch.optim.AdamW(trainer.groups, lr=tc.scst_lr, weight_decay=tc.weight_decay)

    def run_epoch(self, trainer: Trainer, epoch: int, shuffle: torch.Generator) -> EpochResult:
        tc = trainer.cfg.train
        result = scst.scst_epoch(trainer.model, trainer.source.train_array(), trainer.reward_data(), trainer.vocab,
                                 trainer.optimizer, tc, trainer.step, trainer.device, shuffle,
                                 desc=f"epoch {epoch + 1}/{trainer.total_epochs} (scst)",
                                 precision=trainer.precision)
        trainer.step = result.step
        return EpochResult(result.loss, {"phase": self.name, "lr": tc.scst_lr,
                                         "train_reward": round(result.sample_reward, 6),
                                         "train_greedy_reward": round(result.greedy_reward, 6),
                                         **{f"scst_seconds_{part}": round(t, 2) for part, t in result.seconds.items()}})


def schedule(cfg: Config) -> list[tuple[Phase, int]]:
    """The phases of a run with their epoch counts, in order."""
    return [(XEPhase(), cfg.train.epochs), (ScstPhase(), cfg.train.scst_epochs)]
