"""The training loop (fit): phases of epochs, dev evaluation after each, checkpoints, patience, resume.

`fit` is three steps, as minGPT's `Trainer.run` is a loop with callbacks:

    restore   a resumed run's last.pt: its config, weights, optimizer state, progress, held-out dev images
    build     device and processes, data (and the vocabulary a run from init_from extends), decoder,
              optimizer, the `Trainer` the phases share, and a resumed run's state loaded into them
    run       the phases (captioner.train.phases) epoch by epoch: seeds, one epoch, dev metrics, patience;
              each epoch's end is handed to callbacks, and `write_epoch_end` (checkpoints, the log line,
              the curves: captioner.train.run_dir) is the one every run has

Resuming is exact because every source of randomness is a pure function of the epoch (the shuffle
order and the dropout masks are seeded from `seed` and the epoch number), the learning rate is a pure
function of the step, and the optimizer state is saved at the end of every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from captioner import allocator, checkpoint, distributed
from captioner.atomic import atomic_write_text
from captioner.config import Config, from_dict, load_config, to_dict, to_toml, validate
from captioner.data import holdout
from captioner.data.holdout import Holdout
from captioner.data.dataset import CaptionDataset, Collate
from captioner.device import resolve_device
from captioner.errors import CaptionerError, NonFiniteLoss
from captioner.model.decoder import CaptionDecoder
from captioner.precision import Precision, announce, resolve as resolve_precision
from captioner.train.init_from import boost_new_rows, extend_vocabulary, grow_rows, load_init, report_new_words
from captioner.train.neighbours import write_run_index
from captioner.train.phases import Trainer, schedule
from captioner.train.run_dir import BEST, CONFIG, LAST, write_epoch
from captioner.train.sources import EndToEnd, FeatureSource, Prepared, prepare_data
from captioner.train.validate import dev_loss, evaluate
from captioner.vision.encoders import feature_differences

log = logging.getLogger("captioner")


def _is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def fit(cfg: Config | None, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate each epoch, keep best and last checkpoints; returns the final log entry.

    Three steps: `restore` what a resumed run left in last.pt, `build` the data, model, optimizer and
    `Trainer`, then `run` the phases (captioner.train.phases: cross-entropy, then self-critical), each asked
    for one epoch at a time; evaluation, patience and resuming are the same for every phase, and what an
    epoch's end writes (checkpoints, the log line) is a callback, `write_epoch_end`.
    Under torchrun every process runs this function; rank 0 alone writes the run directory.
    """
    run_dir = Path(run_dir)
    cfg, restored = restore(cfg, run_dir, resume)
    built = build(cfg, run_dir, restored)
    try:
        return run(built, [write_epoch_end])
    finally:
        distributed.shutdown(built.trainer.dist)


# ---- restore: what a resumed run left ----------------------------------------------------------------
@dataclass
class Restored:
    """A resumed run's last.pt: its model, its training state and the held-out dev images it started with."""

    path: Path
    model: checkpoint.LoadedModel
    state: checkpoint.TrainingState
    holdout: Holdout | None


def restore(cfg: Config | None, run_dir: Path, resume: bool) -> tuple[Config, Restored | None]:
    """The run's config, and with `resume` what its last.pt holds (None: nothing trained yet).

    A new run into a directory that holds one, or a resume with nothing to resume, is a CaptionerError."""
    last_path = run_dir / LAST
    if not resume:
        if last_path.exists():
            raise CaptionerError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
        return cfg, None
    if last_path.is_file():
        model, state = checkpoint.read_training(last_path)
        cfg = validate(from_dict(state.config))
        return cfg, Restored(last_path, model, state, model.holdout(last_path))
    if (run_dir / CONFIG).is_file():
        # Stopped before its first epoch ended: nothing was trained yet, so start afresh from its config.
        log.info("%s has no %s yet (stopped before its first epoch ended): starting it afresh from its "
                 "config.toml", run_dir, LAST)
        return load_config(run_dir / CONFIG), None
    raise CaptionerError(f"{run_dir}: nothing to resume (no {LAST} and no config.toml)")


# ---- build: data, model, optimizer, Trainer ------------------------------------------------------------
@dataclass
class Progress:
    """Where the run stands between epochs (the step is the Trainer's)."""

    epoch: int = 0  # epochs finished
    best: float | None = None  # the best value of train.select_metric so far
    bad_epochs: int = 0  # epochs since it improved


@dataclass
class Run:
    """A built run: what `run` trains and what its epoch-end callbacks read."""

    cfg: Config
    run_dir: Path
    trainer: Trainer
    progress: Progress
    n_eval: int  # the dev images whose greedy captions are scored each epoch (the first n_eval)
    eval_refs: list[list[str]]  # their reference captions
    new_words_from: int | None  # the first id of the words added to an init_from model's vocabulary

    @property
    def last_path(self) -> Path:
        return self.run_dir / LAST


def build(cfg: Config, run_dir: Path, restored: Restored | None) -> Run:
    """Everything a run needs, on the device and in the processes it trains in; a resumed run's weights,
    optimizer state and progress loaded. Rank 0 writes config.toml, the held-out list and the run's index."""
    tc = cfg.train
    try:
        device = resolve_device(tc.device)
    except CaptionerError as err:
        raise CaptionerError(f"train.device: {err}") from None
    dist = distributed.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(tc.precision, device)
    if dist.is_main:
        announce(precision)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, to_toml(cfg))
    data, init, added = _data(cfg, run_dir, restored, dist, precision)
    vocab, source = data.vocab, data.features
    train_set = CaptionDataset(data.train, vocab, source.rows(data.train), cfg.data.max_len)
    n_eval = min(tc.eval_images, len(data.val)) if tc.eval_images else len(data.val)
    eval_refs = [list(r.captions) for r in data.val[:n_eval]]

    model, groups, optimizer = _decoder_and_optimizer(cfg, data, device)
    progress, step = Progress(), 0
    if init is not None:
        checkpoint.load_state(model, grow_rows(init.model.state_dict(), init.vocab, len(added), cfg.train.new_words),
                              cfg.train.init_from)
    # The first id of the words added to the vocabulary of the model the run started from (None: none added).
    new_from = len(init.vocab) if init is not None and added else None
    if restored is not None:
        new_from = restored.model.new_words_from
        progress, step = _load_restored(restored, model, source, optimizer)
        log.info("resuming %s at epoch %d (step %d)", run_dir, progress.epoch, step)
    if new_from is not None:
        boost_new_rows(optimizer, model, new_from, tc.new_words_lr_scale)
    # DDP averages gradients across processes during backward; checkpoints save the unwrapped model.
    trained = EndToEnd(source.encoder, model) if source.encoder is not None else model
    trained = DistributedDataParallel(trained) if dist.active else trained
    trainer = Trainer(cfg, data, model, trained, groups, optimizer, train_set, device, dist, run_dir / BEST,
                      precision, step=step, total_epochs=tc.epochs + tc.scst_epochs)

    n_params = sum(p.numel() for p in model.parameters())
    if dist.is_main:
        log.info("%s decoder, %s conditioning, %d layer(s), %.1fM parameters; %d captions, %d steps/epoch "
                 "on %s x %d", cfg.model.cell, cfg.model.conditioning, cfg.model.num_layers, n_params / 1e6,
                 len(train_set), trainer.steps_per_epoch(), device, dist.world)
        log.info("allocator: %s", allocator.describe())
    if tc.scst_epochs and dist.active:
        raise CaptionerError("train.scst_epochs: self-critical training runs in one process; run it without "
                             "torchrun (e.g. --resume the run after its cross-entropy epochs)")
    return Run(cfg, run_dir, trainer, progress, n_eval, eval_refs, new_from)


def _decoder_and_optimizer(cfg: Config, data: Prepared, device: torch.device) -> tuple[
        CaptionDecoder, list[dict[str, Any]], torch.optim.Optimizer]:
    """A fresh decoder (its weights drawn from train.seed) on `device`, and its optimizer over the decoder
    and the fine-tuned encoder blocks, if any (their parameter groups too)."""
    vocab, source = data.vocab, data.features
    torch.manual_seed(cfg.train.seed)
    model = CaptionDecoder(cfg.model, vocab_size=len(vocab), feature_dim=source.dim, pad_id=vocab.pad_id).to(device)
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    if source.encoder is not None:
        source.encoder.to(device)
        groups.append({"params": [p for p in source.encoder.parameters() if p.requires_grad],
                       "lr_scale": cfg.encoder.fine_tune_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return model, groups, optimizer


def _load_restored(restored: Restored, model: CaptionDecoder, source: FeatureSource,
                   optimizer: torch.optim.Optimizer) -> tuple[Progress, int]:
    """A resumed run's weights and optimizer state loaded; -> its progress and step."""
    checkpoint.load_state(model, restored.model.model.state_dict(), restored.path)
    if source.encoder is not None:
        checkpoint.load_state(source.encoder, restored.model.encoder_state or {}, restored.path)
    state = restored.state
    optimizer.load_state_dict(state.optimizer)
    return Progress(state.epoch, state.best, state.bad_epochs), state.step


def _data(cfg: Config, run_dir: Path, restored: Restored | None, dist: distributed.Dist,
          precision: Precision) -> tuple[Prepared, checkpoint.LoadedModel | None, list[str]]:
    """The prepared data (its vocabulary extended by a run from init_from that asks for it), the model the
    run starts from (None: from scratch, or resumed) and the words it added to that model's vocabulary."""
    init, added = None, []
    vocab = restored.model.vocab if restored is not None else None
    if cfg.train.init_from and restored is None:  # a resumed run's weights and vocabulary are in last.pt
        init = load_init(cfg)
        vocab = init.vocab
        if dist.is_main:
            log.info("starting from %s: %s decoder, vocabulary of %d words", cfg.train.init_from,
                     cfg.model.cell, len(vocab))
    data = prepare_data(cfg, vocab, dist, precision=precision,
                        recorded=restored.holdout if restored is not None else None)
    if init is not None:
        differs = feature_differences(init.encoder_spec(), data.features.spec())
        if differs:
            raise CaptionerError(f"train.init_from {cfg.train.init_from}: trained on {cfg.encoder.name} features "
                                 f"with other settings ({'; '.join(differs)}) than this install's encoder provides")
        if cfg.train.new_words != "off":  # the new captions' frequent words join the model's vocabulary
            extended, added = extend_vocabulary(vocab, data.train, cfg.data.min_count)
            data = dataclasses.replace(data, vocab=extended)
        if dist.is_main:
            report_new_words(data.train, data.vocab, added, cfg.train.init_from, cfg.data.min_count,
                             extended=cfg.train.new_words != "off")
    if dist.is_main and data.holdout is not None:
        holdout.write(run_dir, data.holdout)
        log.info("%s has no val split: %s; listed in %s", cfg.data.root, data.holdout.describe(),
                 run_dir / holdout.FILE_NAME)
    if dist.is_main:
        write_run_index(run_dir, data)
    return data, init, added


# ---- run: the phases, epoch by epoch ------------------------------------------------------------------
@dataclass(frozen=True)
class EpochEnd:
    """What an epoch's end hands the callbacks: its log entry, its dev metrics, and whether it is the best."""

    entry: dict[str, Any]
    metrics: dict[str, float]
    improved: bool


EpochCallback = Callable[[Run, EpochEnd], None]


def run(built: Run, callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Train `built` from where its progress stands to the end of its last phase (or its patience),
    evaluating on dev after every epoch and calling each callback, in every process; -> the last log entry."""
    cfg, trainer, progress = built.cfg, built.trainer, built.progress
    tc, dist = cfg.train, trainer.dist
    entry: dict[str, Any] = {}
    first = 0  # the phase's first epoch
    for phase, n_epochs in schedule(cfg):
        end = first + n_epochs
        patience = phase.patience(tc)
        while first <= progress.epoch < end:
            if progress.epoch == first and first > 0:  # a later phase starts afresh, from the best model so far
                phase.begin(trainer)
                progress.bad_epochs = 0
            if patience > 0 and progress.bad_epochs >= patience:
                log.info("early stop of %s: %s did not improve for %d epochs%s", phase.name,
                         tc.select_metric, patience, "; on to the next phase" if end < trainer.total_epochs
                         else "")
                progress.epoch = end
                break
            # Randomness is a function of (seed, epoch) alone, so a resumed run repeats it exactly. Every
            # process draws the same global batches and takes its own slice of each.
            torch.manual_seed(tc.seed * 100_003 + progress.epoch + 7919 * dist.rank)
            shuffle = torch.Generator().manual_seed(tc.seed * 100_003 + progress.epoch)
            t0 = time.perf_counter()
            try:
                result = phase.run_epoch(trainer, progress.epoch, shuffle)
            except NonFiniteLoss as err:
                good = f"{built.last_path}" if built.last_path.exists() else "none (no epoch finished)"
                raise CaptionerError(f"training stopped: {err}; last good checkpoint: {good}") from None
            train_time = time.perf_counter() - t0
            progress.epoch += 1
            metrics = dev_metrics(trainer, built.n_eval, built.eval_refs)
            value = metrics[tc.select_metric]
            improved = _is_better(value, progress.best, tc.select_metric)
            if improved:
                progress.best, progress.bad_epochs = value, 0
            else:
                progress.bad_epochs += 1
            entry = {"epoch": progress.epoch, "step": trainer.step, "train_loss": round(result.loss, 6),
                     **result.log, "train_seconds": round(train_time, 2),
                     **{f"val_{k}": round(v, 6) for k, v in metrics.items()}, "best": improved}
            for callback in callbacks:
                callback(built, EpochEnd(entry, metrics, improved))
            dist.barrier()
        first = end
    return entry


def write_epoch_end(built: Run, end: EpochEnd) -> None:
    """The epoch-end callback of every run: rank 0 writes the best and last checkpoints (the model, the
    training state, the held-out dev images, the first added word's id), the log line and the curves."""
    trainer, progress = built.trainer, built.progress
    if not trainer.dist.is_main:
        return
    data, source = trainer.data, trainer.source
    state = checkpoint.TrainingState(to_dict(built.cfg), trainer.optimizer.state_dict(), progress.epoch,
                                     trainer.step, progress.best, progress.bad_epochs, end.metrics)
    payload = checkpoint.training_payload(trainer.model, data.vocab, source.spec(), state, source.encoder_state(),
                                          holdout=data.holdout, new_words_from=built.new_words_from)
    write_epoch(built.run_dir, end.entry, end.metrics, end.improved, payload)


def dev_metrics(trainer: Trainer, n_eval: int, eval_refs: list[list[str]]) -> dict[str, float]:
    """The dev split's teacher-forced loss and the greedy captions' scores, with the model as it is now."""
    data, vocab, device = trainer.data, trainer.vocab, trainer.device
    val_array, val_rows = trainer.source.val_array(data.val, device)
    val_set = CaptionDataset(data.val, vocab, val_rows, trainer.cfg.data.max_len)
    val_loader = DataLoader(val_set, batch_size=512, shuffle=False, pin_memory=device.type == "cuda",
                            collate_fn=Collate(val_set, val_array, vocab.pad_id))
    eval_feats = torch.from_numpy(np.asarray(val_array[val_rows[:n_eval]], dtype=np.float32))
    metrics = {"loss": dev_loss(trainer.model, val_loader, device, vocab.pad_id, trainer.precision)}
    metrics.update(evaluate(trainer.model, eval_feats, eval_refs, vocab, trainer.cfg.train.eval_max_len, device,
                            dist=trainer.dist, precision=trainer.precision))
    return metrics
