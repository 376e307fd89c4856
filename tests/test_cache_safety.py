"""The feature cache under stress: a killed extraction keeps its committed chunks, two processes
extracting into one cache keep each other's rows, and features of different precisions never mix."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from cache_worker import BATCH, CHUNK, SPEC, TinyEncoder
from captioner.precision import resolve
from captioner.vision.features import ARRAY_FILE, CHUNK_PREFIX, INDEX_FILE, cache_folder, extract_features

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("cache_worker.py")


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.new("RGB", (18 + i % 5, 12), ((7 * i) % 256, (255 - 5 * i) % 256, (3 * i) % 256)).save(path)
        paths.append(path)
    return paths


def expected(path: Path) -> torch.Tensor:
    x = transforms.ToTensor()(Image.open(path).convert("RGB").resize((16, 16)))
    return torch.cat([x.mean((1, 2)), x.mean().reshape(1)])


def worker(cache: Path, paths: list[Path], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), str(cache), *map(str, paths), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed_rows(cache: Path) -> int:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    index = folder / INDEX_FILE
    return len(json.loads(index.read_text())["entries"]) if index.exists() else 0


def test_killed_extraction_resumes_and_redoes_at_most_one_chunk(tmp_path):
    paths = make_images(tmp_path / "imgs", 30)
    rng = random.Random(20240611)
    for attempt in range(2):  # two seeded kill points, each in a fresh cache
        cache = tmp_path / f"cache{attempt}"
        kill_after = rng.randrange(CHUNK + 1, len(paths) - BATCH)
        proc = worker(cache, paths, "--kill-after", str(kill_after))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, err
        # Every chunk finished before the kill was committed: the work lost is under one chunk.
        finished = (kill_after - 1) // BATCH * BATCH  # images of the batches before the one killed
        done = committed_rows(cache)
        assert done == finished // CHUNK * CHUNK and finished - done < CHUNK
        encoder = TinyEncoder()
        store = extract_features(encoder, paths, cache, batch_size=BATCH, num_workers=0, progress=False,
                                 chunk_size=CHUNK)
        assert encoder.images_seen == len(paths) - done  # nothing committed is computed again
        torch.testing.assert_close(store.get(paths), torch.stack([expected(p) for p in paths]), atol=2e-3, rtol=0)
        # The chunks were merged into one array and no stray file is left.
        assert sorted(p.name for p in store.folder.iterdir()) == sorted([ARRAY_FILE, INDEX_FILE, ".lock"])


def test_two_processes_extracting_into_one_cache_keep_each_others_rows(tmp_path):
    paths = make_images(tmp_path / "imgs", 36)
    cache = tmp_path / "cache"
    a, b = paths[:24], paths[12:]  # overlapping halves
    ready_a, ready_b = tmp_path / "a.ready", tmp_path / "b.ready"
    procs = [worker(cache, a, "--delay", "0.05", "--ready", str(ready_a), "--wait-for", str(ready_b)),
             worker(cache, b, "--delay", "0.05", "--ready", str(ready_b), "--wait-for", str(ready_a))]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    assert [int(out) for out, _ in outputs] == [len(a), len(b)]
    encoder = TinyEncoder()
    store = extract_features(encoder, paths, cache, batch_size=BATCH, num_workers=0, progress=False)
    assert encoder.images_seen == 0  # every row of both processes is there
    torch.testing.assert_close(store.get(paths), torch.stack([expected(p) for p in paths]), atol=2e-3, rtol=0)


def test_cache_keys_differ_by_precision(tmp_path):
    fp32, bf16 = resolve("fp32", "cpu"), resolve("bf16", "cpu", flags=frozenset({"avx512_bf16"}))
    assert cache_folder(tmp_path, SPEC, "bf16") != cache_folder(tmp_path, SPEC, "fp32")
    assert cache_folder(tmp_path, SPEC, "fp32") == cache_folder(tmp_path, SPEC)  # fp32 keeps its old folder
    paths = make_images(tmp_path / "imgs", 6)
    encoder = TinyEncoder()
    a = extract_features(encoder, paths, tmp_path / "cache", batch_size=BATCH, num_workers=0, progress=False,
                         precision=fp32)
    b = extract_features(encoder, paths, tmp_path / "cache", batch_size=BATCH, num_workers=0, progress=False,
                         precision=bf16)
    assert encoder.images_seen == 12  # a switch of precision never reads the other precision's rows
    assert a.folder != b.folder and (a.precision, b.precision) == ("fp32", "bf16")
    index = json.loads((b.folder / INDEX_FILE).read_text())
    assert index["precision"] == "bf16"
    extract_features(encoder, paths, tmp_path / "cache", batch_size=BATCH, num_workers=0, progress=False,
                     precision=bf16)
    assert encoder.images_seen == 12  # and each precision's own rows are reused


def test_a_format_1_cache_is_read_without_recomputing(tmp_path):
    """Caches written before chunks existed (one array, rows without an array name) stay valid."""
    paths = make_images(tmp_path / "imgs", 5)
    encoder = TinyEncoder()
    store = extract_features(encoder, paths, tmp_path / "cache", batch_size=BATCH, num_workers=0, progress=False)
    index_path = store.folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    meta = index["arrays"][ARRAY_FILE]
    old = {"format": 1, "spec": index["spec"], "shape": meta["shape"], "dtype": "float16",
           "array_bytes": meta["bytes"], "array_checksum": meta["checksum"], "failed": index["failed"],
           "entries": {p: {k: v for k, v in e.items() if k != "array"} for p, e in index["entries"].items()}}
    index_path.write_text(json.dumps(old))
    again = extract_features(encoder, paths, tmp_path / "cache", batch_size=BATCH, num_workers=0, progress=False)
    assert encoder.images_seen == 5
    np.testing.assert_array_equal(again.get(paths).numpy(), store.get(paths).numpy())
    assert not list(again.folder.glob(f"{CHUNK_PREFIX}*"))


class _Killed(Exception):
    pass


def test_a_slow_extraction_commits_by_time_as_well_as_by_count(tmp_path):
    """A kill loses at most about `commit_seconds` of work even where a chunk of images takes far longer:
    here each image "takes" 4 s of a clock the test drives, and a commit is due every 30 s."""
    paths = make_images(tmp_path / "imgs", 14)
    cache = tmp_path / "cache"

    class DiesAtImage9(TinyEncoder):
        def forward_grid(self, x):
            if self.images_seen + x.shape[0] >= 9:
                raise _Killed
            return super().forward_grid(x)

    encoder = DiesAtImage9()
    try:
        extract_features(encoder, paths, cache, batch_size=BATCH, num_workers=0, progress=False, chunk_size=1024,
                         commit_seconds=30.0, clock=lambda: 4.0 * encoder.images_seen)
    except _Killed:
        pass
    # Four batches (8 images, 32 s) passed 30 s: committed although the chunk of 1,024 was far from full.
    assert committed_rows(cache) == 8
    encoder = TinyEncoder()
    store = extract_features(encoder, paths, cache, batch_size=BATCH, num_workers=0, progress=False)
    assert encoder.images_seen == len(paths) - 8
    torch.testing.assert_close(store.get(paths), torch.stack([expected(p) for p in paths]), atol=2e-3, rtol=0)
