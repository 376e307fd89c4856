"""Teacher-forced training: train_one_epoch, evaluate, and the loop that wires them (fit).

Resuming is exact because every source of randomness is a pure function of the epoch (the shuffle
order and the dropout masks are seeded from `seed` and the epoch number), the learning rate is a pure
function of the step, and the optimizer state is saved at the end of every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner import checkpoint, distributed, scst
from captioner.atomic import atomic_write_text, remove_stale_temps
from captioner.config import (
    Config,
    EncoderConfig,
    TrainConfig,
    from_dict,
    load_config,
    to_dict,
    to_toml,
    validate,
)
from captioner.curves import plot_curves
from captioner.data.dataset import (
    Batch,
    BucketBatchSampler,
    CaptionDataset,
    Collate,
    ImageCollate,
)
from captioner.data.records import Record, load_records
from captioner.data.vocab import Vocabulary
from captioner.decoder import CaptionDecoder, detach_hidden
from captioner.distributed import Dist
from captioner.encoders import Encoder, build_encoder
from captioner.errors import CaptionerError, NonFiniteLoss
from captioner.features import FeatureStore, extract_features
from captioner.images import load_image
from captioner.metrics import score_captions
from captioner.search import SuppressWords, greedy

log = logging.getLogger("captioner")

LAST, BEST = "last.pt", "best.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CaptionerError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero (or constant): a pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over non-pad target tokens. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=pad_id, label_smoothing=label_smoothing)


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, step: int, total_steps: int, device: torch.device,
                    pad_id: int, desc: str = "train", dist: Dist = Dist()) -> tuple[float, int]:
    """One pass over the loader. Returns (mean loss per token, global step after the epoch).

    `model` may be wrapped in DistributedDataParallel; each process then sees its share of every global
    batch (BucketBatchSampler's rank slice), and the loss is scaled so that the averaged gradients equal
    those of one process running the whole global batch.
    """
    model.train()
    autocast, scaler = mixed_precision(device)
    total_loss, total_tokens, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=not dist.is_main)
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


def mixed_precision(device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, grad scaler) for the device, so the loop itself has no branches.

    CUDA: bf16 autocast where the GPU supports it (no scaler needed), else fp16 with a GradScaler.
    CPU: nothing, and a disabled scaler whose calls are no-ops.
    """
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler(
            "cuda", enabled=dtype == torch.float16)
    return nullcontext, torch.amp.GradScaler("cpu", enabled=False)


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
        with autocast():
            logits = model(batch.features, batch.inputs, mask)
        loss = F.cross_entropy(logits.float(), batch.targets[mask], reduction="sum",
                               label_smoothing=label_smoothing) * scale
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
            logits = model.out(h[m]).float() if m.any() else None
        if logits is not None:
            loss = F.cross_entropy(logits, batch.targets[:, chunk][m], reduction="sum",
                                   label_smoothing=label_smoothing) * scale
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


@torch.no_grad()
def dev_loss(model: CaptionDecoder, loader: DataLoader, device: torch.device, pad_id: int) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        logits = model(batch.features, batch.inputs)
        n = batch.num_tokens
        total += float(caption_loss(logits, batch.targets, pad_id)) * n
        tokens += n
    return total / max(1, tokens)


@torch.no_grad()
def evaluate(model: CaptionDecoder, features: torch.Tensor, references: list[list[str]], vocab: Vocabulary,
             max_len: int, device: torch.device, batch_size: int = 500, dist: Dist = Dist()) -> dict[str, float]:
    """Greedy-decode every image and score the captions against all references (BLEU, ROUGE-L, CIDEr).

    Under torchrun each process decodes every world-th image; the captions are gathered and rank 0's
    scores are shared, so every process takes the same early-stopping decision.
    """
    model.eval()
    searchable = SuppressWords(model, [vocab.unk_id, vocab.pad_id, vocab.start_id])  # as caption.py decodes
    mine = torch.arange(dist.rank, len(features), dist.world)
    hyps: list[str] = []
    for i in range(0, len(mine), batch_size):
        ids = greedy(searchable, features[mine[i:i + batch_size]].to(device), max_len=max_len,
                     start_id=vocab.start_id, end_id=vocab.end_id)
        hyps.extend(vocab.decode(seq) for seq in ids)
    gathered = dist.gather(hyps)
    totals = None
    if dist.is_main:
        captions = {int(i): gathered[r][j] for r in range(dist.world)
                    for j, i in enumerate(range(r, len(features), dist.world))}
        scores = score_captions({i: refs for i, refs in enumerate(references)}, captions, meteor=False)
        totals = dict(scores.totals)
    return dist.broadcast(totals)


# ---- data wiring: records -> vocabulary -> cached image vectors ---------------------------------------
@dataclass
class Prepared:
    train: list[Record]
    val: list[Record]
    vocab: Vocabulary
    features: CachedFeatures | FineTunedFeatures


def prepare_data(cfg: Config, vocab: Vocabulary | None = None, dist: Dist = Dist()) -> Prepared:
    """Read the dataset, build (or reuse) the vocabulary, and make sure every image has a cached v."""
    if not cfg.data.root:
        raise CaptionerError("no dataset given: pass --data ROOT (or set data.root in the config)")
    records = load_records(cfg.data.root, format=cfg.data.format, strict=cfg.data.strict)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not train:
        raise CaptionerError(f"{cfg.data.root}: the dataset has no training images")
    if not val:
        raise CaptionerError(f"{cfg.data.root}: the dataset has no val/dev images to select a model on")
    if vocab is None:
        vocab = Vocabulary.build((c for r in train for c in r.captions), min_count=cfg.data.min_count)
    if dist.is_main:
        log.info("%d train and %d val images; vocabulary of %d words (min_count %d)",
                 len(train), len(val), len(vocab), cfg.data.min_count)
    encoder = build_encoder(cfg.encoder.name, flip_average=cfg.encoder.flip_average)
    if cfg.encoder.fine_tune > 0:  # images go through the CNN at every step: the cache is bypassed
        return Prepared(train, val, vocab, FineTunedFeatures(encoder.unfreeze_last(cfg.encoder.fine_tune),
                                                             [r.image for r in train + val], cfg.encoder))
    paths = [r.image for r in train + val]
    store = extract_features(encoder, paths, Path(cfg.data.cache_dir), batch_size=cfg.encoder.batch_size,
                             num_workers=cfg.encoder.num_workers, dist=dist)
    train = [r for r in train if r.image in store]
    val = [r for r in val if r.image in store]
    return Prepared(train, val, vocab, CachedFeatures(store))


class CachedFeatures:
    """Image vectors from the frozen encoder's memory-mapped cache (the default)."""

    encoder = None  # nothing to train

    def __init__(self, store: FeatureStore):
        self.store = store
        self.dim = store.dim

    def rows(self, records: list[Record]) -> np.ndarray:
        return self.store.rows([r.image for r in records])

    def collate(self, dataset: CaptionDataset, pad_id: int) -> Collate:
        return Collate(dataset, self.store.array, pad_id)

    def val_array(self, records: list[Record], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(array, rows): the val images' vectors as rows of an array (here: the cache itself)."""
        return self.store.array, self.rows(records)

    def spec_dict(self) -> dict[str, Any]:
        return asdict(self.store.spec)

    def state(self) -> dict[str, Any]:
        return {}


class FineTunedFeatures:
    """The encoder's last blocks train with the decoder: every batch's images go through the CNN."""

    def __init__(self, encoder: Encoder, paths: list[Path], cfg: EncoderConfig):
        self.encoder = encoder
        self.dim = encoder.spec.feature_dim
        self.paths = list(dict.fromkeys(paths))
        self.row_of = {p: i for i, p in enumerate(self.paths)}
        self.cfg = cfg

    def rows(self, records: list[Record]) -> np.ndarray:
        return np.array([self.row_of[r.image] for r in records], dtype=np.int64)

    def collate(self, dataset: CaptionDataset, pad_id: int) -> ImageCollate:
        return ImageCollate(dataset, self.paths, self.encoder.preprocess, pad_id)

    @torch.no_grad()
    def val_array(self, records: list[Record], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """The val images encoded by the encoder as it is now (it changes every epoch)."""
        self.encoder.eval()
        paths = [r.image for r in records]
        vectors = []
        for i in range(0, len(paths), self.cfg.batch_size):
            images = torch.stack([self.encoder.preprocess(load_image(p)) for p in paths[i:i + self.cfg.batch_size]])
            vectors.append(self.encoder(images.to(device)).float().cpu().numpy())
        return np.concatenate(vectors), np.arange(len(paths))

    def spec_dict(self) -> dict[str, Any]:
        """The spec, with `weights` naming these fine-tuned weights: their features never share a cache."""
        digest = hashlib.blake2b(digest_size=8)
        for tensor in self.encoder.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        spec = asdict(self.encoder.spec)
        return {**spec, "weights": f"{spec['weights']}+finetuned-{digest.hexdigest()}"}

    def state(self) -> dict[str, Any]:
        return {"encoder_state": self.encoder.state_dict()}


class EndToEnd(torch.nn.Module):
    """Encoder and decoder as one module, for fine-tuning: forward(images, inputs, mask) -> logits."""

    def __init__(self, encoder: Encoder, decoder: CaptionDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None):
        return self.decoder(self.encoder(images), inputs, mask)


# ---- the loop -----------------------------------------------------------------------------------------
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
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    data = prepare_data(cfg, vocab, dist)
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
                    train_loss, step = train_one_epoch(trained, loader, optimizer, tc, step, total_steps, device,
                                                       vocab.pad_id, desc=f"epoch {epoch + 1}/{total_epochs}",
                                                       dist=dist)
                    extra = {"phase": "xe", "lr": lr_at(step - 1, tc, total_steps)}
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
                                             device, shuffle, desc=f"epoch {epoch + 1}/{total_epochs} (scst)")
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
            metrics = {"loss": dev_loss(model, val_loader, device, vocab.pad_id)}
            metrics.update(evaluate(model, eval_feats, eval_refs, vocab, tc.eval_max_len, device, dist=dist))
            value = metrics[tc.select_metric]
            improved = _is_better(value, best, tc.select_metric)
            best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
            entry = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 6), **extra,
                     "train_seconds": round(train_time, 2),
                     **{f"val_{k}": round(v, 6) for k, v in metrics.items()}, "best": improved}
            if dist.is_main:
                _write_epoch(run_dir, entry, metrics, improved, {
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


def _write_epoch(run_dir: Path, entry: dict[str, Any], metrics: dict[str, float], improved: bool,
                 payload: dict[str, Any]) -> None:
    """Rank 0's end of an epoch: a log line, a message, the best and last checkpoints."""
    # Checkpoints first: a kill between the two leaves a log one epoch behind, which the resumed run
    # rewrites, rather than a log line for an epoch that resume will run again.
    if improved:
        checkpoint.save(run_dir / BEST, payload)
    checkpoint.save(run_dir / LAST, payload)
    for name in ("log.jsonl", "curves.png", "config.toml"):
        remove_stale_temps(run_dir / name)  # what a writer killed mid-write left behind
    lines = [line for line in _read_lines(run_dir / "log.jsonl") if json.loads(line)["epoch"] < entry["epoch"]]
    atomic_write_text(run_dir / "log.jsonl", "".join(f"{line}\n" for line in lines + [json.dumps(entry)]))
    plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
    log.info("epoch %d: train loss %.4f, val loss %.4f, BLEU-4 %.2f, CIDEr %.2f (%.0fs)%s", entry["epoch"],
             entry["train_loss"], metrics["loss"], metrics.get("BLEU-4", float("nan")),
             metrics.get("CIDEr", float("nan")), entry["train_seconds"], "  * best" if improved else "")


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


