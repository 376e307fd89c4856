"""torchrun with two gloo processes on the CPU trains the same weights as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.train import loop as training
from captioner.config import load_config
from captioner.vision.encoders import build_encoder
from captioner.vision.features import extract_features
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    data = make_flickr_layout(tmp_path / "flickr")
    cache = tmp_path / "cache"
    # fp32 on every CPU: the comparison is of exact gradient averaging, not of bf16 rounding (which `auto`
    # would bring where the CPU has native bf16), and the fp32 cache is the one extracted again below.
    overrides = ["train.epochs=2", "train.batch_size=8", "model.dropout=0.0", "train.device=cpu",
                 "train.precision=fp32", "encoder.num_workers=0", f"data.cache_dir={cache}"]
    # Two processes on a fresh cache: they split the feature extraction and rank 0 writes one cache.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", "--config", "configs/tiny.toml", "--data", str(data), "--run-dir", str(tmp_path / "ddp"),
           *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = list(cache.iterdir())
    assert len(folders) == 1 and (folders[0] / "features.npy").is_file()

    # The split extraction equals one process's (up to the float16 storage), for every image.
    paths = sorted((data / "Images").glob("*.jpg"))
    shared = extract_features(build_encoder(), paths, cache, num_workers=0).get(paths)
    alone = extract_features(build_encoder(), paths, tmp_path / "cache-alone", num_workers=0).get(paths)
    torch.testing.assert_close(shared, alone, rtol=2e-3, atol=2e-3)

    # One process, same global batch, same features (the cache written by the two): same weights.
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", *overrides])
    single = training.fit(cfg, tmp_path / "single")
    a = checkpoint.read(tmp_path / "single" / "last.pt")
    b = checkpoint.read(tmp_path / "ddp" / "last.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    assert len((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote it
    assert abs(b["metrics"]["loss"] - single["val_loss"]) < 1e-4
