"""The training loop (fit): phases of epochs, dev evaluation after each, checkpoints, patience, resume.

Resuming is exact because every source of randomness is a pure function of the epoch (the shuffle
order and the dropout masks are seeded from `seed` and the epoch number), the learning rate is a pure
function of the step, and the optimizer state is saved at the end of every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
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
from captioner.data.dataset import CaptionDataset, Collate
from captioner.device import resolve_device
from captioner.errors import CaptionerError, NonFiniteLoss
from captioner.model.decoder import CaptionDecoder
from captioner.precision import announce, resolve as resolve_precision
from captioner.train.init_from import boost_new_rows, extend_vocabulary, grow_rows, load_init, report_new_words
from captioner.train.neighbours import write_run_index
from captioner.train.phases import Trainer, schedule
from captioner.train.run_dir import BEST, LAST, write_epoch
from captioner.train.sources import EndToEnd, prepare_data
from captioner.train.validate import dev_loss, evaluate

log = logging.getLogger("captioner")


def _is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def fit(cfg: Config | None, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate each epoch, keep best and last checkpoints; returns the final log entry.

    The run is its phases in order (captioner.train.phases: cross-entropy, then self-critical), each asked
    for one epoch at a time; evaluation, checkpoints, patience and resuming are the same for every phase.
    Under torchrun every process runs this function; rank 0 alone writes the run directory.
    """
    run_dir = Path(run_dir)
    last_path = run_dir / LAST
    resumed: checkpoint.TrainingState | None = None
    resumed_model = None
    vocab = None
    recorded = None  # the held-out dev images a resumed run started with
    if resume:
        if last_path.is_file():
            resumed_model, resumed = checkpoint.read_training(last_path)
            cfg = validate(from_dict(resumed.config))
            vocab = resumed_model.vocab
            if resumed_model.checkpoint.get("holdout") is not None:
                recorded = holdout.Holdout.from_dict(resumed_model.checkpoint["holdout"], str(last_path))
        elif (run_dir / "config.toml").is_file():
            # Stopped before its first epoch ended: nothing was trained yet, so start afresh from its config.
            log.info("%s has no %s yet (stopped before its first epoch ended): starting it afresh from its "
                     "config.toml", run_dir, LAST)
            cfg = load_config(run_dir / "config.toml")
        else:
            raise CaptionerError(f"{run_dir}: nothing to resume (no {LAST} and no config.toml)")
    elif last_path.exists():
        raise CaptionerError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")

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
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    init, added = None, []
    if cfg.train.init_from and resumed is None:  # a resumed run's weights and vocabulary are in last.pt
        init = load_init(cfg)
        vocab = init.vocab
        if dist.is_main:
            log.info("starting from %s: %s decoder, vocabulary of %d words", cfg.train.init_from,
                     cfg.model.cell, len(vocab))
    data = prepare_data(cfg, vocab, dist, precision, recorded)
    if init is not None:
        differs = data.features.spec().differences(init.encoder_spec())
        if differs:
            raise CaptionerError(f"train.init_from {cfg.train.init_from}: trained on {cfg.encoder.name} features "
                                 f"with other settings ({', '.join(differs)}) than this install's encoder provides")
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
    vocab, source = data.vocab, data.features
    train_set = CaptionDataset(data.train, vocab, source.rows(data.train), cfg.data.max_len)
    n_eval = min(tc.eval_images, len(data.val)) if tc.eval_images else len(data.val)
    eval_refs = [list(r.captions) for r in data.val[:n_eval]]

    torch.manual_seed(tc.seed)
    model = CaptionDecoder(cfg.model, vocab_size=len(vocab), feature_dim=source.dim, pad_id=vocab.pad_id).to(device)
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    if source.encoder is not None:
        source.encoder.to(device)
        groups.append({"params": [p for p in source.encoder.parameters() if p.requires_grad],
                       "lr_scale": cfg.encoder.fine_tune_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    epoch, best, bad_epochs = 0, None, 0
    step = 0
    if init is not None:
        checkpoint.load_state(model, grow_rows(init.model.state_dict(), init.vocab, len(added), cfg.train.new_words),
                              cfg.train.init_from)
    # The first id of the words added to the vocabulary of the model the run started from (None: none added).
    new_from = len(init.vocab) if init is not None and added else None
    if resumed is not None:
        new_from = resumed_model.checkpoint.get("new_words_from")
        checkpoint.load_state(model, resumed_model.model.state_dict(), last_path)
        if source.encoder is not None:
            checkpoint.load_state(source.encoder, resumed_model.encoder_state or {}, last_path)
        optimizer.load_state_dict(resumed.optimizer)
        epoch, step, best, bad_epochs = resumed.epoch, resumed.step, resumed.best, resumed.bad_epochs
        log.info("resuming %s at epoch %d (step %d)", run_dir, epoch, step)
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
    entry: dict[str, Any] = {}
    try:
        first = 0  # the phase's first epoch
        for phase, n_epochs in schedule(cfg):
            end = first + n_epochs
            patience = phase.patience(tc)
            while first <= epoch < end:
                if epoch == first and first > 0:  # a later phase starts afresh, from the best model so far
                    phase.begin(trainer)
                    bad_epochs = 0
                if patience > 0 and bad_epochs >= patience:
                    log.info("early stop of %s: %s did not improve for %d epochs%s", phase.name,
                             tc.select_metric, patience, "; on to the next phase" if end < trainer.total_epochs
                             else "")
                    epoch = end
                    break
                # Randomness is a function of (seed, epoch) alone, so a resumed run repeats it exactly. Every
                # process draws the same global batches and takes its own slice of each.
                torch.manual_seed(tc.seed * 100_003 + epoch + 7919 * dist.rank)
                shuffle = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
                t0 = time.perf_counter()
                try:
                    result = phase.run_epoch(trainer, epoch, shuffle)
                except NonFiniteLoss as err:
                    good = f"{last_path}" if last_path.exists() else "none (no epoch finished)"
                    raise CaptionerError(f"training stopped: {err}; last good checkpoint: {good}") from None
                train_time = time.perf_counter() - t0
                epoch += 1
                metrics = _dev_metrics(trainer, n_eval, eval_refs)
                value = metrics[tc.select_metric]
                improved = _is_better(value, best, tc.select_metric)
                best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
                entry = {"epoch": epoch, "step": trainer.step, "train_loss": round(result.loss, 6), **result.log,
                         "train_seconds": round(train_time, 2),
                         **{f"val_{k}": round(v, 6) for k, v in metrics.items()}, "best": improved}
                if dist.is_main:
                    state = checkpoint.TrainingState(to_dict(cfg), trainer.optimizer.state_dict(), epoch,
                                                     trainer.step, best, bad_epochs, metrics)
                    payload = checkpoint.training_payload(model, vocab, source.spec(), state,
                                                          source.encoder_state())
                    if data.holdout is not None:
                        payload["holdout"] = data.holdout.to_dict()
                    if new_from is not None:
                        payload["new_words_from"] = new_from
                    write_epoch(run_dir, entry, metrics, improved, payload)
                dist.barrier()
            first = end
    finally:
        distributed.shutdown(dist)
    return entry


def _dev_metrics(trainer: Trainer, n_eval: int, eval_refs: list[list[str]]) -> dict[str, float]:
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
