"""Training pairs (image vector, caption) as a torch Dataset, and the collate that pads them.

Each item is one reference caption of one image; an image with five captions gives five items. The
image vectors stay in the feature store's memory-mapped array: a batch gathers only its own rows, so a
COCO-sized cache is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from captioner.data.records import Record
from captioner.data.vocab import Vocabulary


log = logging.getLogger("captioner")


@dataclass
class Batch:
    features: torch.Tensor  # (B, F) float32 image vectors
    inputs: torch.Tensor  # (B, T) <start> w_1 ... w_n, padded
    targets: torch.Tensor  # (B, T) w_1 ... w_n <end>, padded with pad_id (ignored by the loss)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.features, self.inputs, self.targets)))

    @property
    def num_tokens(self) -> int:
        return int((self.targets != 0).sum())


class CaptionDataset(Dataset):
    """(feature row, encoded caption) for every reference caption of every record.

    Captions are held as one padded int32 array plus lengths, not as Python lists: half a million COCO
    captions cost ~50 MB instead of several hundred, so memory stays flat as the data grows.
    """

    def __init__(self, records: Sequence[Record], vocab: Vocabulary, rows: np.ndarray, max_len: int):
        # rows[i] is records[i]'s row in the feature array (FeatureStore.rows).
        n = sum(len(r.captions) for r in records)
        self.rows = np.empty(n, dtype=np.int64)
        self.tokens = np.full((n, max_len + 2), vocab.pad_id, dtype=np.int32)  # <start> words <end>
        self.lengths = np.empty(n, dtype=np.int32)
        i = 0
        for record, row in zip(records, rows):
            for caption in record.captions:
                ids = vocab.encode(caption, max_len=max_len)
                self.rows[i] = row
                self.tokens[i, : len(ids)] = ids
                self.lengths[i] = len(ids)
                i += 1

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int:
        return index  # the collate gathers rows and tokens for the whole batch at once


class Collate:
    """Gathers a batch's captions and image vectors (from the memory-mapped feature array) and pads."""

    def __init__(self, dataset: CaptionDataset, features: np.ndarray, pad_id: int):
        self.dataset = dataset
        self.features = features  # (N, F) float16, usually a np.memmap
        self.pad_id = pad_id

    def __call__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        ds = self.dataset
        feats = torch.from_numpy(np.asarray(self.features[ds.rows[idx]], dtype=np.float32))
        T = int(ds.lengths[idx].max()) - 1
        tokens = torch.from_numpy(ds.tokens[idx, : T + 1].astype(np.int64))  # (B, T + 1), padded
        return Batch(feats, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


class BucketBatchSampler:
    """Shuffled batches of captions of similar length, so little of each batch is padding.

    The dataset order is shuffled, cut into pools of `pool` batches, each pool sorted by caption length
    and cut into batches, and the batches shuffled again. All randomness comes from `generator`, so the
    same seed gives the same batches (exact resume).

    Distributed: every process draws the same global batches (same generator seed) and yields its slice
    `batch[rank::world]`; a last global batch too small to give every process a caption is dropped.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, rank: int = 0,
                 world: int = 1, pool: int = 50):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.rank, self.world = rank, world
        self.pool = pool

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest >= self.world else 0)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator)
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            if len(batches[i]) >= self.world:
                yield batches[i][self.rank::self.world]
