"""Teacher-forced training: train_one_epoch, evaluate, and the loop that wires them (fit).

Resuming is exact because every source of randomness is a pure function of the epoch (the shuffle
order and the dropout masks are seeded from `seed` and the epoch number), the learning rate is a pure
function of the step, and the optimizer state is saved at the end of every epoch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from captioner import checkpoint, distributed
from captioner.atomic import atomic_write_text
from captioner.config import Config, from_dict, load_config, to_dict, to_toml, validate
from captioner.data.dataset import BucketBatchSampler, CaptionDataset, Collate
from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError, NonFiniteLoss
from captioner.model.decoder import CaptionDecoder
from captioner.precision import announce, resolve as resolve_precision
from captioner.train import scst, step as train_step
from captioner.train.run_dir import BEST, LAST, write_epoch
from captioner.train.sources import EndToEnd, prepare_data
from captioner.train.validate import dev_loss, evaluate

log = logging.getLogger("captioner")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CaptionerError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def _is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def fit(cfg: Config | None, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate each epoch, keep best and last checkpoints; returns the final log entry.

    Under torchrun every process runs this function; rank 0 alone writes the run directory.
    """
    run_dir = Path(run_dir)
    last_path = run_dir / LAST
    state: dict[str, Any] | None = None
    vocab = None
    if resume:
        if last_path.is_file():
            state = checkpoint.read(last_path, training=True)
            cfg = validate(from_dict(state["config"]))
            vocab = Vocabulary.from_dict(state["vocab"])
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
    device = resolve_device(tc.device)
    dist = distributed.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(tc.precision, device)
    if dist.is_main:
        announce(precision)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    data = prepare_data(cfg, vocab, dist, precision)
    vocab = data.vocab
    source = data.features

    train_set = CaptionDataset(data.train, vocab, source.rows(data.train), cfg.data.max_len)
    pin = device.type == "cuda"  # page-locked batches, copied with non_blocking=True
    collate = source.collate(train_set, vocab.pad_id)
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
    steps_per_epoch = len(BucketBatchSampler(train_set.lengths, tc.batch_size, torch.Generator(), world=dist.world))
    total_steps = steps_per_epoch * tc.epochs
    epoch, step, best, bad_epochs = 0, 0, None, 0
    if state is not None:
        checkpoint.load_state(model, state["model"], last_path)
        if source.encoder is not None:
            checkpoint.load_state(source.encoder, state["encoder_state"], last_path)
        optimizer.load_state_dict(state["optimizer"])
        epoch, step = state["epoch"], state["step"]
        best, bad_epochs = state["best"], state["bad_epochs"]
        log.info("resuming %s at epoch %d (step %d)", run_dir, epoch, step)
    # DDP averages gradients across processes during backward; checkpoints save the unwrapped model.
    trained = EndToEnd(source.encoder, model) if source.encoder is not None else model
    trained = DistributedDataParallel(trained) if dist.active else trained

    n_params = sum(p.numel() for p in model.parameters())
    if dist.is_main:
        log.info("%s decoder, %s conditioning, %d layer(s), %.1fM parameters; %d captions, %d steps/epoch "
                 "on %s x %d", cfg.model.cell, cfg.model.conditioning, cfg.model.num_layers, n_params / 1e6,
                 len(train_set), steps_per_epoch, device, dist.world)
    if tc.scst_epochs and dist.active:
        raise CaptionerError("train.scst_epochs: self-critical training runs in one process; run it without "
                             "torchrun (e.g. --resume the run after its cross-entropy epochs)")
    reward_data = None
    total_epochs = tc.epochs + tc.scst_epochs
    entry: dict[str, Any] = {}
    try:
        while epoch < total_epochs:
            patience_out = tc.patience > 0 and bad_epochs >= tc.patience
            if patience_out and epoch < tc.epochs and tc.scst_epochs:
                log.info("early stop of cross-entropy: %s did not improve for %d epochs; on to self-critical "
                         "training", tc.select_metric, tc.patience)
                epoch = tc.epochs
            elif patience_out:
                break
            # Randomness is a function of (seed, epoch) alone, so a resumed run repeats it exactly. Every
            # process draws the same global batches and takes its own slice of each.
            torch.manual_seed(tc.seed * 100_003 + epoch + 7919 * dist.rank)
            shuffle = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            try:
                if epoch < tc.epochs:
                    sampler = BucketBatchSampler(train_set.lengths, tc.batch_size, shuffle, dist.rank, dist.world)
                    loader = DataLoader(train_set, collate_fn=collate, batch_sampler=sampler, pin_memory=pin)
                    train_loss, step = train_step.train_one_epoch(trained, loader, optimizer, tc, step, total_steps, device,
                                                       vocab.pad_id, desc=f"epoch {epoch + 1}/{total_epochs}",
                                                       dist=dist, precision=precision)
                    extra = {"phase": "xe", "lr": train_step.lr_at(step - 1, tc, total_steps)}
                else:
                    if epoch == tc.epochs:  # self-critical training starts from the best cross-entropy model
                        if (run_dir / BEST).is_file():
                            checkpoint.load_state(model, checkpoint.read(run_dir / BEST)["model"], run_dir / BEST)
                        optimizer = torch.optim.AdamW(groups, lr=tc.scst_lr, weight_decay=tc.weight_decay)
                        bad_epochs = 0
                    if reward_data is None:
                        reward_data = scst.RewardData([r.image for r in data.train], source.rows(data.train),
                                                      [list(r.captions) for r in data.train])
                    result = scst.scst_epoch(model, source.store.array, reward_data, vocab, optimizer, tc, step,
                                             device, shuffle, desc=f"epoch {epoch + 1}/{total_epochs} (scst)",
                                             precision=precision)
                    train_loss, step = result.loss, result.step
                    extra = {"phase": "scst", "lr": tc.scst_lr, "train_reward": round(result.sample_reward, 6),
                             "train_greedy_reward": round(result.greedy_reward, 6)}
            except NonFiniteLoss as err:
                good = f"{last_path}" if last_path.exists() else "none (no epoch finished)"
                raise CaptionerError(f"training stopped: {err}; last good checkpoint: {good}") from None
            train_time = time.perf_counter() - t0
            epoch += 1
            val_array, val_rows = source.val_array(data.val, device)
            val_set = CaptionDataset(data.val, vocab, val_rows, cfg.data.max_len)
            val_loader = DataLoader(val_set, batch_size=512, shuffle=False, pin_memory=pin,
                                    collate_fn=Collate(val_set, val_array, vocab.pad_id))
            eval_feats = torch.from_numpy(np.asarray(val_array[val_rows[:n_eval]], dtype=np.float32))
            metrics = {"loss": dev_loss(model, val_loader, device, vocab.pad_id, precision)}
            metrics.update(evaluate(model, eval_feats, eval_refs, vocab, tc.eval_max_len, device, dist=dist,
                                    precision=precision))
            value = metrics[tc.select_metric]
            improved = _is_better(value, best, tc.select_metric)
            best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
            entry = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 6), **extra,
                     "train_seconds": round(train_time, 2),
                     **{f"val_{k}": round(v, 6) for k, v in metrics.items()}, "best": improved}
            if dist.is_main:
                write_epoch(run_dir, entry, metrics, improved, {
                    **checkpoint.model_payload(model, vocab, source.spec_dict()), **source.state(),
                    "config": to_dict(cfg), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                    "best": best, "bad_epochs": bad_epochs, "metrics": metrics,
                })
            dist.barrier()
    finally:
        distributed.shutdown(dist)
    if bad_epochs >= tc.patience > 0 and epoch < total_epochs:
        log.info("early stop: %s did not improve for %d epochs", tc.select_metric, tc.patience)
    return entry
