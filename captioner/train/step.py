"""One optimisation step of teacher-forced training: the learning-rate schedule, the loss, mixed
precision, truncated BPTT, scheduled sampling, and the epoch that repeats them over a loader.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.config import TrainConfig
from captioner.data.dataset import Batch
from captioner.distributed import Dist
from captioner.errors import NonFiniteLoss
from captioner.model.decoder import detach_hidden
from captioner.model.output import Targets, token_loss
from captioner.precision import Precision, resolve


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero (or constant): a pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, step: int, total_steps: int, device: torch.device,
                    pad_id: int, desc: str = "train", dist: Dist = Dist(),
                    precision: Precision | None = None) -> tuple[float, int]:
    """One pass over the loader. Returns (mean loss per token, global step after the epoch).

    `model` may be wrapped in DistributedDataParallel; each process then sees its share of every global
    batch (BucketBatchSampler's rank slice), and the loss is scaled so that the averaged gradients equal
    those of one process running the whole global batch.

    `precision` (default: cfg.precision resolved for the device) sets the GEMMs' number format.
    """
    model.train()
    autocast, scaler = mixed_precision(precision or resolve(cfg.precision, device))
    total_loss, total_tokens, start = 0.0, 0, time.perf_counter()
    # disable=None: no bar where stderr is not a terminal (a log file gets no line per step)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
               disable=None if dist.is_main else True)
    for batch in bar:
        batch: Batch = batch.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, total_steps) * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        n = batch.num_tokens
        n_global = dist.sum(n)  # the global batch's real tokens: every process divides by the same count
        sampling = cfg.scheduled_sampling * min(1.0, step / max(1, total_steps))  # linear ramp from 0
        loss = backward_batch(model, batch, pad_id, cfg.label_smoothing, cfg.tbptt, autocast,
                              n_tokens=n_global, world=dist.world, scaler=scaler, sampling=sampling)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step, loss.item())
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        total_loss += loss.item() * n_global / dist.world  # this process's share of the global sum
        total_tokens += n
        bar.set_postfix(loss=f"{loss.item() / dist.world:.3f}",
                        tok_s=f"{total_tokens * dist.world / (time.perf_counter() - start):.0f}")
    return dist.sum(total_loss) / max(1, dist.sum(total_tokens)), step


def mixed_precision(precision: Precision | torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, grad scaler) for a precision, so the loop itself has no branches.

    A device instead of a precision means "auto" on it (see captioner.precision.resolve): on CUDA bf16
    autocast where the GPU supports it, else fp16 with a GradScaler; on the CPU bf16 where it is native.
    bf16 and fp32 get a disabled scaler whose calls are no-ops. Parameters, gradients and the optimizer
    state stay fp32; the loss is computed from fp32 logits.
    """
    if not isinstance(precision, Precision):
        precision = resolve("auto", precision)
    return precision.autocast, precision.grad_scaler()


def backward_batch(model: torch.nn.Module, batch: Batch, pad_id: int, label_smoothing: float = 0.0,
                   tbptt: int = 0, autocast=nullcontext, n_tokens: float | None = None,
                   world: int = 1, scaler: torch.amp.GradScaler | None = None,
                   sampling: float = 0.0) -> torch.Tensor:
    """Loss (mean over real tokens) and its gradients for one batch; returns the detached loss.

    Full BPTT runs the whole sequence through the fused kernels and backpropagates once. With tbptt = K
    the sequence is cut into chunks of K steps: each chunk starts from the previous chunk's final state,
    detached, so the state flows forward but no gradient crosses a chunk boundary, and each chunk's
    graph is freed by its own backward (memory grows with K, not with the sequence length). The chunk
    losses are weighted by their share of the tokens, so with K >= T this is exactly full BPTT.

    Under DistributedDataParallel (world > 1) `n_tokens` is the global batch's token count: each
    process's summed loss / n_tokens * world, averaged over processes by DDP, is the global mean.

    sampling > 0: scheduled sampling (Bengio et al. 2015), see `scheduled_inputs`.
    """
    if sampling > 0:
        with autocast():
            batch = scheduled_inputs(model, batch, sampling, pad_id)
    mask = batch.targets != pad_id  # score only real tokens: skips the output GEMM on padding
    T = batch.inputs.shape[1]
    scale = world / (n_tokens if n_tokens is not None else mask.sum())
    if tbptt <= 0 or tbptt >= T:
        with autocast():  # the loss, chunked over tokens, in fp32 (captioner.model.output)
            loss = model(batch.features, batch.inputs, mask, Targets(batch.targets[mask], scale, label_smoothing))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    # Chunks call the decoder's own methods, not DDP's forward: gradients are averaged by hand below.
    ddp = model if isinstance(model, DistributedDataParallel) else None
    model = ddp.module if ddp is not None else model
    total = torch.zeros((), device=mask.device)
    hidden = None
    for start in range(0, T, tbptt):
        chunk = slice(start, start + tbptt)
        m = mask[:, chunk]
        with autocast():
            h, hidden = model.run(batch.features, batch.inputs[:, chunk], hidden)
            loss = token_loss(h[m], model.out, Targets(batch.targets[:, chunk][m], scale, label_smoothing)) \
                if m.any() else None
        if loss is not None:
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total = total + loss.detach()
        hidden = detach_hidden(hidden)
    if ddp is not None:
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
    return total


@torch.no_grad()
def scheduled_inputs(model: torch.nn.Module, batch: Batch, chance: float, pad_id: int) -> Batch:
    """Scheduled sampling: each input word after <start> becomes, with probability `chance`, a word drawn
    from the model's own prediction at that position instead of the reference word.

    Bengio et al. feed the draw step by step, which needs a Python loop over time; this is the two-pass
    form (Mihaylova and Liu 2019): one teacher-forced pass without gradients predicts every position at
    once, the draws replace the chosen inputs, and the training pass runs on the mixed inputs through the
    fused kernels. The targets stay the reference words.
    """
    logits = model(batch.features, batch.inputs)  # (B, T, V): position t predicts word t + 1
    drawn = torch.distributions.Categorical(logits=logits.float()).sample()  # (B, T)
    real = batch.inputs[:, 1:] != pad_id
    swap = (torch.rand(real.shape, device=real.device) < chance) & real
    inputs = batch.inputs.clone()
    inputs[:, 1:] = torch.where(swap, drawn[:, :-1], batch.inputs[:, 1:])
    return Batch(batch.features, inputs, batch.targets)
