"""Where training gets its image vectors: the frozen encoder's cache, or the encoder itself when its last
blocks are fine-tuned. Both implement `FeatureSource`, so the loop never asks which one it has.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from captioner.config import Config, EncoderConfig
from captioner.data import holdout
from captioner.data.dataset import Batch, CaptionDataset, Collate
from captioner.data.holdout import Holdout
from captioner.data.records import Record, load_records
from captioner.data.vocab import Vocabulary
from captioner.distributed import Dist
from captioner.model.decoder import CaptionDecoder
from captioner.errors import CaptionerError
from captioner.precision import Precision
from captioner.vision.encoders import Encoder, EncoderSpec, build_encoder
from captioner.vision.features import FeatureStore, extract_features
from captioner.vision.images import load_image

log = logging.getLogger("captioner")


class FeatureSource(Protocol):
    """Where the image vectors of training come from: what the training loop and its phases ask of it."""

    encoder: Encoder | None  # the encoder whose blocks train with the decoder, or None (frozen, cached)
    dim: int  # the length of v

    def rows(self, records: list[Record]) -> np.ndarray:
        """(N,) the records' rows in `train_array()` (or in the image list the collate reads)."""

    def collate(self, dataset: CaptionDataset, pad_id: int) -> Any:
        """The DataLoader collate that turns a dataset's indices into a Batch."""

    def val_array(self, records: list[Record], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(array, rows): the val images' vectors as rows of an array, as the encoder is now."""

    def train_array(self) -> np.ndarray:
        """The vectors that self-critical training samples captions for, indexed by `rows`."""

    def spec(self) -> EncoderSpec:
        """What defines these features (stored in every checkpoint)."""

    def encoder_state(self) -> dict[str, torch.Tensor] | None:
        """Weights of a fine-tuned encoder, to store with the decoder's; None when frozen."""


@dataclass
class Prepared:
    train: list[Record]
    val: list[Record]
    vocab: Vocabulary
    features: FeatureSource
    holdout: Holdout | None = None  # the training images held out as dev, when the dataset has no val split


def prepare_data(cfg: Config, vocab: Vocabulary | None = None, dist: Dist = Dist(), *,
                 precision: Precision, recorded: Holdout | None = None) -> Prepared:
    """Read the dataset, build (or reuse) the vocabulary, and make sure every image has a cached v
    (extracted in `precision`, and cached apart from features of another precision).

    A dataset without a val split gives a slice of its training images as dev (captioner.data.holdout):
    `recorded`, the slice a resumed run started with, or one chosen from data.holdout and holdout_seed."""
    if not cfg.data.root:
        raise CaptionerError("no dataset given: pass --data ROOT (or set data.root in the config)")
    records = load_records(cfg.data.root, format=cfg.data.format, strict=cfg.data.strict)
    if not any(r.split == "train" for r in records):
        raise CaptionerError(f"{cfg.data.root}: the dataset has no training images")
    if not any(r.split == "val" for r in records) and (recorded is not None or cfg.data.holdout > 0):
        records, held = _hold_out(records, cfg, recorded, dist)
    else:
        held = None
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not val:
        raise CaptionerError(f"{cfg.data.root}: the dataset has no val/dev images to select a model on "
                             f"(set data.holdout above 0 to hold some training images out as dev)")
    built = vocab is None
    if built:
        vocab = Vocabulary.build((c for r in train for c in r.captions), min_count=cfg.data.min_count)
    if dist.is_main:
        log.info("%d train and %d val images; vocabulary of %d words (%s)", len(train), len(val), len(vocab),
                 f"min_count {cfg.data.min_count}" if built else "the model's own")
    encoder = build_encoder(cfg.encoder.name, flip_average=cfg.encoder.flip_average, pooling=cfg.encoder.pooling,
                            tags=cfg.encoder.tags)
    if cfg.encoder.fine_tune > 0:  # images go through the CNN at every step: the cache is bypassed
        return Prepared(train, val, vocab, FineTunedFeatures(encoder.unfreeze_last(cfg.encoder.fine_tune),
                                                             [r.image for r in train + val], cfg.encoder), held)
    paths = [r.image for r in train + val]
    store = extract_features(encoder, paths, Path(cfg.data.cache_dir), batch_size=cfg.encoder.batch_size,
                             num_workers=cfg.encoder.num_workers, dist=dist, precision=precision)
    train = [r for r in train if r.image in store]
    val = [r for r in val if r.image in store]
    return Prepared(train, val, vocab, CachedFeatures(store), held)


def _hold_out(records: list[Record], cfg: Config, recorded: Holdout | None,
              dist: Dist) -> tuple[list[Record], Holdout]:
    """The records with a slice of the training images relabelled val, and that slice."""
    root = cfg.data.root
    chosen = holdout.choose(records, root, cfg.data.holdout, cfg.data.holdout_seed) if cfg.data.holdout > 0 else None
    held = recorded or chosen
    records, missing = held.apply(records, root)
    if missing:
        raise CaptionerError(f"{root}: {len(missing)} of the {len(held.images)} held-out dev images this run "
                             f"started with are no longer among the training images (first: {missing[0]}); "
                             "the dataset changed, so start a new run")
    if dist.is_main:
        if recorded is not None and chosen is not None and chosen.images != recorded.images:
            log.warning("%s: the training images changed since this run started (%d now, %d then); keeping "
                        "the dev images it started with", root, chosen.of, recorded.of)
    return records, held


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

    def train_array(self) -> np.ndarray:
        return self.store.array

    def spec(self) -> EncoderSpec:
        return self.store.spec

    def encoder_state(self) -> None:
        return None


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

    def train_array(self) -> np.ndarray:
        raise CaptionerError("self-critical training needs cached features (a frozen encoder, "
                             "encoder.fine_tune = 0)")

    def spec(self) -> EncoderSpec:
        """The spec, with `weights` naming these fine-tuned weights: their features never share a cache."""
        digest = hashlib.blake2b(digest_size=8)
        for tensor in self.encoder.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        spec = self.encoder.spec
        return replace(spec, weights=f"{spec.weights}+finetuned-{digest.hexdigest()}")

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return self.encoder.state_dict()


class EndToEnd(torch.nn.Module):
    """Encoder and decoder as one module, for fine-tuning: forward(images, inputs, mask) -> logits."""

    def __init__(self, encoder: Encoder, decoder: CaptionDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                targets=None):
        return self.decoder(self.encoder(images), inputs, mask, targets)


class ImageCollate:
    """For fine-tuning the encoder: the batch's images (decoded here, in DataLoader workers) instead of
    cached vectors, in Batch.features as (B, 3, H, W). An unreadable image drops its captions from the
    batch with a warning naming the file."""

    def __init__(self, dataset: CaptionDataset, paths: Sequence, preprocess, pad_id: int):
        self.dataset, self.paths, self.preprocess, self.pad_id = dataset, list(paths), preprocess, pad_id

    def __call__(self, indices: list[int]) -> Batch:
        ds = self.dataset
        kept, images = [], []
        for i in indices:
            try:
                images.append(self.preprocess(load_image(self.paths[ds.rows[i]])))
                kept.append(i)
            except CaptionerError as err:
                log.warning("skipping captions of an unreadable image: %s", err)
        if not kept:
            raise CaptionerError(f"no image of a training batch could be read (first: {self.paths[ds.rows[indices[0]]]})")
        idx = np.asarray(kept, dtype=np.int64)
        T = int(ds.lengths[idx].max()) - 1
        tokens = torch.from_numpy(ds.tokens[idx, : T + 1].astype(np.int64))
        return Batch(torch.stack(images), tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
