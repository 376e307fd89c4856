"""The feature cache: run the CNN once per image, memory-map the vectors, reuse them every epoch.

    store = extract_features(build_encoder(), paths, Path("cache"))
    v = store.get(batch_paths)            # (N, 1280) float32, rows in the order asked

Layout: cache_dir/<encoder name>-<hash of its EncoderSpec and precision>/ holds
    features.npy    (N, dim) float16, opened with mmap_mode="r" so many workers share one copy in memory
    chunk-*.npy     rows committed by an extraction still running (or killed), merged into features.npy
                    when an extraction finishes
    index.json      spec, precision, each array's shape and checksum, and per image:
                    absolute path -> array, row, size, mtime_ns
    .lock           the file lock every reader and writer of the folder holds while it touches the files
Different encoders, preprocessing or precisions (bf16 autocast vs fp32 features) hash to different folders,
so features never mix; fp32 features keep the folder they had before precisions existed. An image whose
size or mtime changed is recomputed; an array that does not match the checksum in the index (a crash
mid-write, a truncated copy) loses its rows, which are recomputed, rather than being read as garbage.

Extraction commits its work every `chunk_size` images, and also whenever `commit_seconds` (30 s) of work
have passed since the last commit, whichever comes first: a chunk file, then the index that lists it, each
written to a temporary name and renamed into place, under the lock. A killed extraction keeps every chunk
it committed, so its rerun redoes at most the chunk it was working on: at most 1,024 images and about 30 s
of work, however slow the machine. (Under torchrun every commit gathers all processes' rows, so the
processes commit by count alone, together.) Every commit re-reads the index
under the lock and merges into it, so two processes extracting into one cache at once never lose each
other's rows; at the end the chunks are merged into one features.npy (also under the lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.atomic import atomic_write, remove_stale_temps
from captioner.distributed import Dist
from captioner.vision.encoders import Encoder, EncoderSpec, spec_key
from captioner.errors import CaptionerError
from captioner.vision.images import load_image
from captioner.precision import Precision, default

log = logging.getLogger("captioner")

ARRAY_FILE, INDEX_FILE, LOCK_FILE, CHUNK_PREFIX = "features.npy", "index.json", ".lock", "chunk-"
CHUNK_IMAGES = 1024  # images per commit (rounded to whole batches)
COMMIT_SECONDS = 30.0  # ... or a commit after this much work, if that comes first
LOCK_TIMEOUT_S = 3600.0  # a lock is held for one chunk write or one merge: waiting an hour means trouble
_FORMAT = 2  # bump when the layout changes; format 1 (one array, fp32) is read as it is


def cache_key(spec: EncoderSpec, precision: str = "fp32") -> dict:
    """The dict that names a cache folder: the spec's key, plus the precision when it is not fp32."""
    key = spec_key(spec)
    return key if precision == "fp32" else {**key, "precision": precision}


def cache_folder(cache_dir: Path, spec: EncoderSpec, precision: str = "fp32") -> Path:
    """cache_dir/<name>-<16 hex digits of the key's hash>: one folder per distinct feature definition."""
    blob = json.dumps(cache_key(spec, precision), sort_keys=True).encode()
    return Path(cache_dir) / f"{spec.name}-{hashlib.sha256(blob).hexdigest()[:16]}"


class FeatureStore:
    """Read-only view of one cache folder: image path -> row of a memory-mapped (rows, dim) float16 array.

    `array` may also hold rows of images cached earlier but not asked for in this call; only the paths
    asked for (and found unchanged or recomputed) are served.
    """

    def __init__(self, folder: Path, spec: EncoderSpec, array: np.ndarray, rows: dict[str, int],
                 failures: dict[Path, str] | None = None, precision: str = "fp32"):
        self.folder, self.spec, self.array, self.precision = folder, spec, array, precision
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
                     num_workers: int = 2, progress: bool = True, dist: Dist = Dist(),
                     precision: Precision | None = None, chunk_size: int = CHUNK_IMAGES,
                     commit_seconds: float = COMMIT_SECONDS,
                     clock: Callable[[], float] = time.monotonic) -> FeatureStore:
    """Features for `image_paths`, computing only those not already cached (or changed since).

    Unreadable images are logged (one warning each), get no row, and are listed in `store.failures`.
    The encoder runs on whatever device its parameters are on, its GEMMs and convolutions in `precision`
    (features of each precision are cached apart; None: captioner.precision.default on the encoder's device,
    auto as on the command line). Work is committed every `chunk_size` images and, in a
    single process, whenever `commit_seconds` by `clock` have passed since the last commit.

    Under torchrun (`dist.world` > 1) every process encodes every world-th image still to do; rank 0
    gathers each chunk's vectors and commits them, and the others open the cache once it is in place.
    """
    if not encoder.frozen:
        # Cached features are keyed by the spec, which says nothing about fine-tuned weights.
        raise CaptionerError(f"encoder {encoder.spec.name} has trainable blocks; features of a "
                             "fine-tuned encoder cannot be cached (freeze it or skip the cache)")
    if precision is None:
        precision = default(next(encoder.parameters()).device)
    cache = _Cache(cache_folder(Path(cache_dir), encoder.spec, precision.name), encoder.spec, precision.name)
    with cache.lock():
        index, _ = cache.load()
    entries: dict[str, dict] = index["entries"]    # path -> {"array", "row", "size", "mtime_ns"}
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

    if todo:
        mine = todo[dist.rank::dist.world]
        per_commit = max(1, chunk_size // batch_size) * batch_size  # whole batches, so commits fall between them
        commits = math.ceil(math.ceil(len(todo) / dist.world) / per_commit)
        pending: tuple[dict, dict] = ({}, {})
        done = made = 0
        committed_at = clock()
        bar = tqdm(total=len(todo), unit="img", desc=f"features ({encoder.spec.name}, {precision.name})",
                   disable=None if progress and dist.is_main else True)  # None: no bar off a terminal
        with bar:
            for rows, fails in _encode(encoder, mine, batch_size, num_workers, precision):
                pending[0].update(rows)
                pending[1].update(fails)
                done += len(rows) + len(fails)
                bar.update((len(rows) + len(fails)) * dist.world)
                due = done % per_commit == 0 or done == len(mine)
                if not dist.active and not due and clock() - committed_at >= commit_seconds:
                    due = True  # slow images, a slow machine: commit by time too
                if due:
                    failures.update(_commit_shared(cache, dist, todo, *pending, identities))
                    pending, made, committed_at = ({}, {}), made + 1, clock()
            while made < commits:  # this process ran out of images: it still joins every gather
                failures.update(_commit_shared(cache, dist, todo, {}, {}, identities))
                made += 1

    if dist.is_main:
        with cache.lock():
            index, array = cache.merged()
    dist.barrier()  # the other processes may read the cache now
    if not dist.is_main:
        with cache.lock():
            index, array = cache.merged()
    return FeatureStore(cache.folder, encoder.spec, array, _rows_of(index["entries"], asked, failures), failures,
                        precision.name)


def _commit_shared(cache: "_Cache", dist: Dist, todo: list[str], rows: dict[str, np.ndarray],
                   fails: dict[str, str], identities: dict[str, dict]) -> dict[Path, str]:
    """Commit one chunk (every process's share of it under torchrun); -> the chunk's failures."""
    if dist.active:
        shares = dist.gather((rows, fails))
        rows, fails = {}, {}
        for r, f in shares:
            rows.update(r)
            fails.update(f)
        order = {p: i for i, p in enumerate(todo)}
        rows = dict(sorted(rows.items(), key=lambda item: order[item[0]]))  # the single-process order
    if dist.is_main and (rows or fails):
        with cache.lock():
            cache.commit(rows, fails, identities)
    return {Path(p): reason for p, reason in fails.items()}


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


def _encode(encoder: Encoder, paths: list[str], batch_size: int, num_workers: int, precision: Precision):
    """Yield, batch by batch in order, ({path: (dim,) float16 feature}, {path: reason})."""
    if not paths:
        return
    device = next(encoder.parameters()).device
    loader = DataLoader(_ImageFiles(paths, encoder.transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    encoder.eval()
    with torch.inference_mode():
        for indices, images, bad in loader:
            features: dict[str, np.ndarray] = {}
            failures: dict[str, str] = {}
            for i, reason in bad:
                log.warning("skipping image: %s", reason)
                failures[paths[i]] = reason
            if images is not None:
                with precision.autocast():
                    v = encoder(images.to(device, non_blocking=True))  # (B, dim)
                for i, row in zip(indices.tolist(), v.float().cpu().numpy().astype(np.float16)):
                    features[paths[i]] = row
            yield features, failures


# --- the files on disk ------------------------------------------------------------------------------------

class _Cache:
    """One cache folder's files. Every method but `lock` expects the caller to hold the lock."""

    def __init__(self, folder: Path, spec: EncoderSpec, precision: str):
        self.folder, self.spec, self.precision = folder, spec, precision

    def lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return _Lock(str(self.folder / LOCK_FILE), timeout=LOCK_TIMEOUT_S)

    def _empty(self) -> dict:
        return {"entries": {}, "failed": {}, "arrays": {}}

    def load(self) -> tuple[dict, dict[str, np.ndarray]]:
        """-> (index, {array name: memmapped array}). An array that fails its checks loses its rows (with a
        warning); an index that cannot be read at all starts the cache afresh."""
        index_path = self.folder / INDEX_FILE
        if not index_path.exists():
            return self._empty(), {}
        try:
            index = _upgrade(json.loads(index_path.read_text()))
            problem = self._check_index(index)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if problem is not None:
            log.warning("feature cache %s is damaged (%s); rebuilding it", self.folder, problem)
            return self._empty(), {}
        arrays: dict[str, np.ndarray] = {}
        damaged = False
        for name, meta in list(index["arrays"].items()):
            try:
                problem = self._check_array(name, meta)
                if problem is None:
                    arrays[name] = np.load(self.folder / name, mmap_mode="r")
            except (OSError, ValueError) as e:
                problem = f"{name}: {type(e).__name__}: {' '.join(str(e).split())}"
            if problem is not None:
                log.warning("feature cache %s is damaged (%s); its rows are recomputed", self.folder, problem)
                del index["arrays"][name]
                damaged = True
        entries = index["entries"]
        lost = [p for p, e in entries.items()
                if e.get("array") not in arrays or not 0 <= e["row"] < arrays[e["array"]].shape[0]]
        for path in lost:
            del entries[path]
        if damaged or lost:
            self._write_index(index)  # the damage is reported once: the index no longer lists it
        return index, arrays

    def _check_index(self, index: dict) -> str | None:
        if index.get("format") != _FORMAT:
            return f"format {index.get('format')}, expected {_FORMAT}"
        if index.get("spec") != json.loads(json.dumps(spec_key(self.spec))):
            return "index was written for a different encoder spec"
        if index.get("precision") != self.precision:
            return f"index holds {index.get('precision')} features, expected {self.precision}"
        if not isinstance(index["entries"], dict) or not isinstance(index["arrays"], dict):
            return "index is malformed"
        return None

    def _check_array(self, name: str, meta: dict) -> str | None:
        """None when the file `name` is exactly the one the index describes."""
        path = self.folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, index says {meta['bytes']}"
        if _checksum(path) != meta["checksum"]:
            return f"{name} checksum mismatch"
        return None

    def _write_array(self, name: str, array: np.ndarray) -> dict:
        path = atomic_write(self.folder / name, lambda f: np.save(f, np.ascontiguousarray(array, np.float16)))
        return {"shape": list(array.shape), "bytes": path.stat().st_size, "checksum": _checksum(path)}

    def _write_index(self, index: dict) -> None:
        index = {**index, "format": _FORMAT, "spec": spec_key(self.spec), "precision": self.precision,
                 "dtype": "float16", "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(self.folder / INDEX_FILE, lambda f: f.write(json.dumps(index).encode()))

    def commit(self, rows: dict[str, np.ndarray], fails: dict[str, str], identities: dict[str, dict]) -> None:
        """Merge one chunk into the index as it is on disk now (other processes may have added to it)."""
        index, _ = self.load()
        if rows:
            name = f"{CHUNK_PREFIX}{uuid.uuid4().hex[:16]}.npy"
            index["arrays"][name] = self._write_array(name, np.stack(list(rows.values())))
            for i, path in enumerate(rows):
                index["entries"][path] = {"array": name, "row": i, **identities[path]}
                index["failed"].pop(path, None)
        for path, reason in fails.items():
            index["failed"][path] = {**identities[path], "reason": reason}
            index["entries"].pop(path, None)
        self._write_index(index)

    def merged(self) -> tuple[dict, np.ndarray]:
        """-> (index, the one memmapped array every entry points into), merging chunks into features.npy
        first when there are any, and deleting the files no index refers to."""
        index, arrays = self.load()
        entries = index["entries"]
        if set(arrays) - {ARRAY_FILE} or (entries and ARRAY_FILE not in arrays):
            groups: dict[str, list[tuple[str, dict]]] = {}  # per array, its live entries (features.npy first)
            for path, e in sorted(entries.items(), key=lambda item: item[1]["array"] != ARRAY_FILE):
                groups.setdefault(e["array"], []).append((path, e))
            parts = [arrays[name][np.asarray([e["row"] for _, e in items])] for name, items in groups.items()]
            kept = [item for items in groups.values() for item in items]  # the rows' order in `merged`
            merged = np.concatenate(parts) if parts else np.zeros((0, self.spec.feature_dim), np.float16)
            index["entries"] = {p: {**e, "array": ARRAY_FILE, "row": i} for i, (p, e) in enumerate(kept)}
            index["arrays"] = {ARRAY_FILE: self._write_array(ARRAY_FILE, merged)}
            self._write_index(index)
            del arrays, parts
            index, arrays = self.load()
        for stale in self.folder.glob(f"{CHUNK_PREFIX}*.npy"):
            if stale.name not in index["arrays"]:
                stale.unlink(missing_ok=True)
        for stale in self.folder.glob(f".{CHUNK_PREFIX}*.tmp"):  # chunk writes killed midway
            stale.unlink(missing_ok=True)
        remove_stale_temps(self.folder / ARRAY_FILE)
        remove_stale_temps(self.folder / INDEX_FILE)
        array = arrays.get(ARRAY_FILE)
        if array is None or not index["entries"]:
            array = np.zeros((0, self.spec.feature_dim), np.float16)
        return index, array


class _Lock(FileLock):
    """FileLock whose timeout is a one-line CaptionerError naming the folder."""

    def acquire(self, *args, **kwargs):
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            raise CaptionerError(f"{self.lock_file}: another process has held the feature cache's lock for "
                                 f"more than {LOCK_TIMEOUT_S:.0f} s") from None


def _upgrade(index: dict) -> dict:
    """A format-1 index (one fp32 array, rows without an array name) in the format-2 layout."""
    if index.get("format") != 1:
        return index
    array = {"shape": index["shape"], "bytes": index["array_bytes"], "checksum": index["array_checksum"]}
    return {**index, "format": _FORMAT, "precision": "fp32", "arrays": {ARRAY_FILE: array} if index["shape"][0] else {},
            "entries": {p: {**e, "array": ARRAY_FILE} for p, e in index["entries"].items()}}


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
