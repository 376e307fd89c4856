"""The feature cache: run the CNN once per image, memory-map the vectors, reuse them every epoch.

    store = extract_features(build_encoder(), paths, Path("cache"))
    v = store.get(batch_paths)            # (N, 1280) float32, rows in the order asked

Layout: cache_dir/<encoder name>-<hash of its EncoderSpec>/ holds
    features.npy   (N, dim) float16, opened with mmap_mode="r" so many workers share one copy in memory
    index.json     spec, array shape and checksum, and per image: absolute path -> row, size, mtime_ns
Different encoders or preprocessing hash to different folders, so features never mix. An image whose size
or mtime changed is recomputed; a cache whose array does not match the checksum in its index (a crash
mid-write, a truncated copy) is rebuilt rather than read as garbage. Both files are written to a temporary
name and renamed into place, array first, so a reader sees either the old pair or the new one, and an
interrupted write leaves a mismatch that the checksum catches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.atomic import atomic_write
from captioner.distributed import Dist
from captioner.vision.encoders import Encoder, EncoderSpec, spec_key
from captioner.errors import CaptionerError
from captioner.vision.images import load_image

log = logging.getLogger("captioner")

ARRAY_FILE, INDEX_FILE = "features.npy", "index.json"
_FORMAT = 1  # bump when the layout changes; older caches are then rebuilt


def cache_folder(cache_dir: Path, spec: EncoderSpec) -> Path:
    """cache_dir/<name>-<16 hex digits of the spec's hash>: one folder per distinct feature definition."""
    blob = json.dumps(spec_key(spec), sort_keys=True).encode()
    return Path(cache_dir) / f"{spec.name}-{hashlib.sha256(blob).hexdigest()[:16]}"


class FeatureStore:
    """Read-only view of one cache folder: image path -> row of a memory-mapped (rows, dim) float16 array.

    `array` may also hold rows of images cached earlier but not asked for in this call; only the paths
    asked for (and found unchanged or recomputed) are served.
    """

    def __init__(self, folder: Path, spec: EncoderSpec, array: np.ndarray, rows: dict[str, int],
                 failures: dict[Path, str] | None = None):
        self.folder, self.spec, self.array = folder, spec, array
        self.dim = spec.feature_dim
        self._rows = rows                    # absolute path string -> row in `array`
        self.failures = failures or {}       # images asked for that could not be read: path -> reason

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and _key(path) in self._rows

    def rows(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """(N,) int64 row indices into `array`, for datasets that index the memmap directly."""
        try:
            return np.fromiter((self._rows[_key(p)] for p in paths), dtype=np.int64, count=len(paths))
        except KeyError as e:
            raise CaptionerError(f"{e.args[0]}: no cached features (the image failed to load or was not "
                                 f"extracted with {self.spec.name})") from None

    def get(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """(N, dim) float32 features, row i for paths[i]."""
        return torch.from_numpy(self.array[self.rows(paths)].astype(np.float32))


def extract_features(encoder: Encoder, image_paths: list[Path], cache_dir: Path, batch_size: int = 64,
                     num_workers: int = 2, progress: bool = True, dist: Dist = Dist()) -> FeatureStore:
    """Features for `image_paths`, computing only those not already cached (or changed since).

    Unreadable images are logged (one warning each), get no row, and are listed in `store.failures`.
    The encoder runs on whatever device its parameters are on.

    Under torchrun (`dist.world` > 1) every process encodes every world-th image still to do; rank 0
    gathers the vectors and writes the one cache, and the others open it once it is in place.
    """
    if not encoder.frozen:
        # Cached features are keyed by the spec, which says nothing about fine-tuned weights.
        raise CaptionerError(f"encoder {encoder.spec.name} has trainable blocks; features of a "
                             "fine-tuned encoder cannot be cached (freeze it or skip the cache)")
    folder = cache_folder(Path(cache_dir), encoder.spec)
    index, old_array = _open_cache(folder, encoder.spec)
    entries: dict[str, dict] = index["entries"]    # path -> {"row", "size", "mtime_ns"}
    failed: dict[str, dict] = index["failed"]      # path -> {"size", "mtime_ns", "reason"}

    asked = list(dict.fromkeys(map(_key, image_paths)))  # deduplicated, order kept
    identities = {}  # taken before decoding, so a file rewritten mid-run is recomputed next time
    todo: list[str] = []
    failures: dict[Path, str] = {}
    for path in asked:
        identity = identities[path] = _identity(path)
        if identity is None:
            failures[Path(path)] = f"{path}: no such file"
        elif path in entries and _same(entries[path], identity):
            continue  # cached and unchanged
        elif path in failed and _same(failed[path], identity):
            failures[Path(path)] = failed[path]["reason"]  # failed before and unchanged: don't retry
        else:
            todo.append(path)
    for reason in failures.values():
        log.warning("skipping image: %s", reason)

    if not todo:  # everything asked for is cached (or known bad): no decoding, no CNN, no write
        return FeatureStore(folder, encoder.spec, old_array, _rows_of(entries, asked, failures), failures)

    mine = todo[dist.rank::dist.world]
    new_rows, new_failures = _run_encoder(encoder, mine, batch_size, num_workers, progress and dist.is_main)
    if dist.active:
        shares = dist.gather((new_rows, new_failures))
        if not dist.is_main:
            dist.barrier()  # wait for rank 0 to write the merged cache, then read it like any later run
            index, array = _open_cache(folder, encoder.spec)
            return FeatureStore(folder, encoder.spec, array, _rows_of(index["entries"], asked, failures), failures)
        new_rows, new_failures = {}, {}
        for rows, fails in shares:
            new_rows.update(rows)
            new_failures.update(fails)
        new_rows = {p: new_rows[p] for p in todo if p in new_rows}  # the single-process order
    failures.update({Path(p): reason for p, reason in new_failures.items()})

    # Keep every old row that is still valid (other callers may want images not asked for now), drop
    # rows of images that were recomputed or now fail, append the new ones.
    replaced = set(new_rows) | set(new_failures) | {str(p) for p in failures}
    kept = [(p, e) for p, e in entries.items() if p not in replaced]
    dim = encoder.spec.feature_dim
    parts = [old_array[[e["row"] for _, e in kept]]] if kept else []
    parts += [np.stack(list(new_rows.values()))] if new_rows else []
    array = np.concatenate(parts).astype(np.float16) if parts else np.zeros((0, dim), np.float16)
    new_entries = {p: {**e, "row": i} for i, (p, e) in enumerate(kept)}
    for p in new_rows:
        new_entries[p] = {"row": len(new_entries), **identities[p]}
    new_failed = {p: f for p, f in failed.items() if p not in replaced}
    for p, reason in new_failures.items():
        new_failed[p] = {**identities[p], "reason": reason}

    _write_cache(folder, encoder.spec, array, new_entries, new_failed)
    dist.barrier()  # the other processes may read the cache now
    _, mapped = _open_cache(folder, encoder.spec)  # reopen as a memmap: the in-memory copy is dropped
    return FeatureStore(folder, encoder.spec, mapped, _rows_of(new_entries, asked, failures), failures)


# --- extraction -------------------------------------------------------------------------------------------

class _ImageFiles(Dataset):
    """Decode + preprocess in DataLoader workers. A bad image yields (i, None, reason) instead of raising,
    so one corrupt JPEG neither kills a worker nor the whole run."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except CaptionerError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - e.g. a transform choking on a 1-pixel image
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"


def _collate(items):
    """-> (indices (B,), images (B, 3, H, W) or None, [(index, reason) for each bad image])."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    if not good:
        return torch.zeros(0, dtype=torch.long), None, bad
    return torch.tensor([i for i, _ in good]), torch.stack([x for _, x in good]), bad


def _run_encoder(encoder: Encoder, paths: list[str], batch_size: int, num_workers: int,
                 progress: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> ({path: (dim,) float16 feature}, {path: reason}) for every path."""
    features: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    if not paths:
        return features, failures
    device = next(encoder.parameters()).device
    loader = DataLoader(_ImageFiles(paths, encoder.transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    # disable=None: no bar where stderr is not a terminal (a log file gets no line per step)
    bar = tqdm(total=len(paths), unit="img", desc=f"features ({encoder.spec.name})",
               disable=None if progress else True)
    encoder.eval()
    with torch.inference_mode(), bar:
        for indices, images, bad in loader:
            for i, reason in bad:
                log.warning("skipping image: %s", reason)
                failures[paths[i]] = reason
            if images is not None:
                v = encoder(images.to(device, non_blocking=True))  # (B, dim)
                for i, row in zip(indices.tolist(), v.float().cpu().numpy().astype(np.float16)):
                    features[paths[i]] = row
            bar.update(len(indices) + len(bad))
    return features, failures


# --- the files on disk ------------------------------------------------------------------------------------

def _open_cache(folder: Path, spec: EncoderSpec) -> tuple[dict, np.ndarray]:
    """-> (index, memmapped array); an empty index if absent, or (with a warning) if it fails any check."""
    empty = {"entries": {}, "failed": {}}, np.zeros((0, spec.feature_dim), np.float16)
    index_path, array_path = folder / INDEX_FILE, folder / ARRAY_FILE
    if not index_path.exists():
        return empty
    try:
        index = json.loads(index_path.read_text())
        problem = _check(index, array_path, spec)
        if problem is None:
            shape = tuple(index["shape"])
            # np.load cannot memory-map a file with no data; an empty cache needs no mapping anyway.
            array = np.load(array_path, mmap_mode="r") if shape[0] else empty[1]
            if array.shape != shape or array.dtype != np.float16:
                problem = f"array is {array.shape} {array.dtype}, index says {shape} float16"
            else:
                return index, array
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {' '.join(str(e).split())}"
    log.warning("feature cache %s is damaged (%s); rebuilding it", folder, problem)
    return empty


def _check(index: dict, array_path: Path, spec: EncoderSpec) -> str | None:
    """None when the index belongs to `spec` and the array file is exactly the one it describes."""
    if index.get("format") != _FORMAT:
        return f"format {index.get('format')}, expected {_FORMAT}"
    if index.get("spec") != json.loads(json.dumps(spec_key(spec))):
        return "index was written for a different encoder spec"
    if not array_path.exists():
        return f"{array_path.name} is missing"
    if array_path.stat().st_size != index["array_bytes"]:
        return f"{array_path.name} has {array_path.stat().st_size} bytes, index says {index['array_bytes']}"
    if _checksum(array_path) != index["array_checksum"]:
        return f"{array_path.name} checksum mismatch"
    rows = sorted(e["row"] for e in index["entries"].values())
    if rows != list(range(index["shape"][0])):
        return "index rows do not cover the array"
    return None


def _write_cache(folder: Path, spec: EncoderSpec, array: np.ndarray, entries: dict, failed: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    array_path = folder / ARRAY_FILE
    atomic_write(array_path, lambda f: np.save(f, array))
    index = {
        "format": _FORMAT, "spec": spec_key(spec), "shape": list(array.shape), "dtype": "float16",
        "array_bytes": array_path.stat().st_size, "array_checksum": _checksum(array_path),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "entries": entries, "failed": failed,
    }
    atomic_write(folder / INDEX_FILE, lambda f: f.write(json.dumps(index).encode()))


def _checksum(path: Path) -> str:
    """blake2b of the whole file: ~20 ms for Flickr8k's 18 MB, so checking on every open is affordable."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- image identity ---------------------------------------------------------------------------------------

def _key(path: str | os.PathLike) -> str:
    return os.path.abspath(path)  # absolute and normalised, without touching the disk


def _identity(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _same(entry: dict, identity: dict) -> bool:
    return entry["size"] == identity["size"] and entry["mtime_ns"] == identity["mtime_ns"]


def _rows_of(entries: dict[str, dict], asked: list[str], failures: dict[Path, str]) -> dict[str, int]:
    """Rows for the paths asked for and verified this call: other cached rows were not checked against
    their files just now, so the store does not serve them."""
    bad = {str(p) for p in failures}
    return {p: entries[p]["row"] for p in asked if p in entries and p not in bad}
