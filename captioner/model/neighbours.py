"""The training images as a nearest-neighbour index: their vectors `v`, their captions, and the encoder.

    index = NeighbourIndex.build(vectors, captions, encoder_spec, names)   # vectors (N, F) as cached
    index.save("run/neighbours.knn");  index = NeighbourIndex.load(path)
    sims, ids = index.search(v, k=15)          # cosine similarity of v to the k nearest training images
    index.captions(ids[0, 0])                  # that image's captions, as lists of words

The vectors are stored as unit rows projected on their top `dims` principal directions (uncentred, so the
projection keeps inner products, i.e. cosine similarity of the unit vectors, up to the discarded
directions), in float16: Flickr8k's 6,000 training images take 3 MB instead of 15. The captions are kept
tokenized, as word ids into the index's own word list, flat: one int32 array and two offset arrays.

An index is only meaningful for the features it was made with, so it records the encoder's spec and the
feature size, and `check_encoder` refuses another in one line. `calibration` holds the few coefficients
of the confidence (captioner.model.confidence) when they were fitted for this index's models.

The file (`.knn`, a torch.save of plain tensors, strings and dicts) sits beside its checkpoint: `MODEL.knn`
for `MODEL.pt`, or `neighbours.knn` in the checkpoint's folder (a run directory, the shipped models).
Format 2 stores the word list and the image names each as one JSON text: a weights-only torch.load
unpickles a list in Python one string at a time (14,000 strings: 80 ms of every cold start), a text at
once. Format 1 (the two as lists) is read as it is.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.atomic import atomic_write
from captioner.errors import CaptionerError
from captioner.model.ngrams import check_base, document_frequencies
from captioner.vision.encoders import feature_differences, spec_with_defaults

SUFFIX = ".knn"
FOLDER_FILE = "neighbours" + SUFFIX  # the index of every checkpoint in a folder (a run directory)
FORMAT = 2
DEFAULT_DIMS = 256


@dataclass
class NeighbourIndex:
    encoder: dict[str, Any]  # the EncoderSpec dict of the features it was made with
    feature_dim: int  # F, the size of `v`
    vectors: torch.Tensor  # (N, D) float16 unit rows
    projection: torch.Tensor | None  # (F, D) float16, or None when the vectors are v itself (D = F)
    words: list[str]  # the captions' word list
    tokens: torch.Tensor  # (T,) int32 word ids of every caption, one after another
    caption_starts: torch.Tensor  # (C + 1,) int64: caption c is tokens[caption_starts[c]:caption_starts[c + 1]]
    image_starts: torch.Tensor  # (N + 1,) int64: image i's captions are caption_starts[image_starts[i]:...]
    names: list[str]  # each image's file name, for showing it
    calibration: dict[str, Any] | None = None  # the confidence's coefficients (captioner.model.confidence)
    # The captions' n-gram document frequencies (captioner.model.ngrams, base len(words) + 2): sorted keys
    # (uint64 stored as int64) and counts, for the n-grams of at least two images.
    df_keys: torch.Tensor | None = None
    df_counts: torch.Tensor | None = None
    _ids: dict[str, int] | None = field(default=None, repr=False)
    _float: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    # ---- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray | torch.Tensor, captions: Sequence[Sequence[Sequence[str]]],
              encoder: dict[str, Any], names: Sequence[str], dims: int = DEFAULT_DIMS) -> NeighbourIndex:
        """vectors (N, F), each image's tokenized captions, the encoder's spec dict, each image's name.

        dims: the projection's size (0, or at least F: no projection, the unit vectors in float16)."""
        x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[0] != len(captions) or len(names) != len(captions):
            raise CaptionerError(f"a neighbour index needs one vector, one name and captions per image "
                                 f"(got {tuple(x.shape)} vectors, {len(names)} names, {len(captions)} captions)")
        x = torch.nn.functional.normalize(x, dim=1)
        projection = None
        if 0 < dims < min(x.shape):
            _, _, vh = torch.linalg.svd(x, full_matrices=False)  # uncentred: keeps inner products
            projection = vh[:dims].T.contiguous()  # (F, D)
            x = torch.nn.functional.normalize(x @ projection, dim=1)
        vocab: dict[str, int] = {}
        flat: list[int] = []
        caption_starts, image_starts = [0], [0]
        for refs in captions:
            for words in refs:
                flat.extend(vocab.setdefault(w, len(vocab)) for w in words)
                caption_starts.append(len(flat))
            image_starts.append(len(caption_starts) - 1)
        index = cls(encoder=spec_with_defaults(dict(encoder)), feature_dim=int(vectors.shape[1]),
                    vectors=x.half(), projection=None if projection is None else projection.half(),
                    words=list(vocab), tokens=torch.tensor(flat, dtype=torch.int32),
                    caption_starts=torch.tensor(caption_starts, dtype=torch.int64),
                    image_starts=torch.tensor(image_starts, dtype=torch.int64), names=list(names))
        index.document_frequencies()
        return index

    @property
    def base(self) -> int:
        """The n-gram keys' base: word ids + 1, and len(words) + 1 for a word the captions never use."""
        return len(self.words) + 2

    def document_frequencies(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted uint64 keys, counts) of the n-grams of at least two images' captions (computed once)."""
        if self.df_keys is None:
            try:
                check_base(self.base)
            except ValueError as err:
                raise CaptionerError(f"a neighbour index: {err}") from None
            keys, counts = document_frequencies(self.tokens.numpy(), self.caption_starts.numpy(),
                                                self.image_starts.numpy(), self.base)
            self.df_keys = torch.from_numpy(keys.view(np.int64).copy())
            self.df_counts = torch.from_numpy(counts.astype(np.int32))
        return self.df_keys.numpy().view(np.uint64), self.df_counts.numpy()

    # ---- using ------------------------------------------------------------------------------------------
    def search(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, F) -> (similarities (B, k) float32, ids (B, k) int64), nearest first."""
        if features.shape[-1] != self.feature_dim:
            raise CaptionerError(f"features have {features.shape[-1]} dimensions; the neighbour index was made "
                                 f"with {self.feature_dim}")
        if self._float is None:  # float32 copies for the matrix products, made once
            self._float = (self.vectors.float(), None if self.projection is None else self.projection.float())
        vectors, projection = self._float
        q = torch.nn.functional.normalize(features.detach().float().cpu(), dim=1)
        if projection is not None:
            q = torch.nn.functional.normalize(q @ projection, dim=1)
        sims = q @ vectors.T  # (B, N)
        return sims.topk(min(k, len(self)), dim=1)

    def caption_range(self, image: int) -> range:
        return range(int(self.image_starts[image]), int(self.image_starts[image + 1]))

    def caption_tokens(self, caption: int) -> np.ndarray:
        """One caption's word ids (into `words`)."""
        return self.tokens[int(self.caption_starts[caption]):int(self.caption_starts[caption + 1])].numpy()

    def captions(self, image: int) -> list[str]:
        """An image's captions as text (lower case, punctuation dropped: as tokenized)."""
        return [" ".join(self.words[t] for t in self.caption_tokens(c)) for c in self.caption_range(image)]

    def word_ids(self) -> dict[str, int]:
        if self._ids is None:
            self._ids = {w: i for i, w in enumerate(self.words)}
        return self._ids

    def check_encoder(self, encoder: dict[str, Any], feature_dim: int, model: str | Path, where: str | Path) -> None:
        """Refuse, in one line, to serve a model whose image vectors are not the ones this index holds."""
        differs = feature_differences(self.encoder, encoder, feature_dims=(self.feature_dim, feature_dim))
        if differs:
            raise CaptionerError(f"{where}: the neighbour index was made with another encoder than {model} reads "
                                 f"(index vs model: {'; '.join(differs)}); rebuild it or remove it")

    # ---- storing ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "encoder": self.encoder, "feature_dim": self.feature_dim,
                "vectors": self.vectors, "projection": self.projection, "words": _as_text(self.words),
                "tokens": self.tokens, "caption_starts": self.caption_starts, "image_starts": self.image_starts,
                "names": _as_text(self.names), "calibration": self.calibration, "df_keys": self.df_keys,
                "df_counts": self.df_counts}

    def save(self, path: str | Path) -> Path:
        atomic_write(path, lambda f: torch.save(self.to_dict(), f))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> NeighbourIndex:
        """Read an index file safely (weights-only: nothing in it runs), with one-line errors."""
        path = Path(path)
        if not path.is_file():
            raise CaptionerError(f"{path}: neighbour index not found")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CaptionerError(f"{path}: refused to load: not a plain-tensor neighbour index") from None
        except Exception as err:  # noqa: BLE001 - whatever fails to parse in a damaged file is the file's fault
            raise CaptionerError(f"{path}: not a readable neighbour index ({' '.join(str(err).split()[:12])})") from None
        keys = ("encoder", "feature_dim", "vectors", "projection", "tokens", "caption_starts", "image_starts")
        needed = (*keys, "words", "names")
        if not isinstance(raw, dict) or any(k not in raw for k in needed):
            raise CaptionerError(f"{path}: not a neighbour index (it lacks "
                                 f"{', '.join(k for k in needed if not isinstance(raw, dict) or k not in raw)})")
        if raw.get("format", 0) > FORMAT:
            raise CaptionerError(f"{path}: neighbour index format {raw['format']} is newer than this captioner "
                                 f"understands ({FORMAT}); upgrade captioner")
        lists = {k: _from_text(raw[k], path, k) for k in ("words", "names")}
        index = cls(**{k: raw[k] for k in keys}, **lists, calibration=raw.get("calibration"),
                    df_keys=raw.get("df_keys"), df_counts=raw.get("df_counts"))
        n = index.vectors.shape[0]
        if (index.image_starts.shape[0] != n + 1 or len(index.names) != n
                or int(index.caption_starts[-1]) != index.tokens.shape[0]
                or int(index.image_starts[-1]) != index.caption_starts.shape[0] - 1):
            raise CaptionerError(f"{path}: damaged neighbour index (its parts disagree on the number of images "
                                 "or captions)")
        return index


def _as_text(strings: Sequence[str]) -> str:
    return json.dumps(list(strings))


def _from_text(stored: Any, path: Path, key: str) -> list[str]:
    """A stored list of strings: JSON text (format 2) or a list (format 1)."""
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError:
            stored = None
    if not isinstance(stored, list) or not all(isinstance(s, str) for s in stored):
        raise CaptionerError(f"{path}: damaged neighbour index (its {key} are not a list of strings)")
    return stored


def index_path(checkpoint: str | Path) -> Path | None:
    """The index that goes with a checkpoint file: MODEL.knn beside MODEL.pt, else neighbours.knn in its
    folder; None when there is neither."""
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint.with_suffix(SUFFIX), checkpoint.parent / FOLDER_FILE):
        if candidate.is_file():
            return candidate
    return None


def find_index(checkpoints: Sequence[str | Path]) -> Path | None:
    """The first index that goes with any of the checkpoints (an ensemble's members share their data)."""
    for ckpt in checkpoints:
        found = index_path(ckpt)
        if found is not None:
            return found
    return None


def index_of_records(records: Sequence, vectors: np.ndarray | torch.Tensor, encoder: dict[str, Any],
                     dims: int = DEFAULT_DIMS) -> NeighbourIndex:
    """The index of training records (captioner.data.records.Record) and their vectors, row for row; the
    captions are tokenized as the vocabulary and CIDEr-D reward tokenize them."""
    from captioner.data.vocab import tokenize

    return NeighbourIndex.build(vectors, [[tokenize(c) for c in r.captions] for r in records], encoder,
                                [Path(r.image).name for r in records], dims)
