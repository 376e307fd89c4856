"""Peak memory of one training epoch as the data grows: COCO-sized against a 10x smaller set.

    python benchmarks/memory_scale.py [--images 113000 --captions-per-image 5 --ratio 10]

Each size runs in its own process on synthetic data laid out like the real thing: image vectors in a
memory-mapped float16 .npy (113k x 1280 = 290 MB on disk), five captions per image, a ~3,000-word
vocabulary. A small decoder keeps the epoch short; the point is what grows with the data (the caption
arrays, the sampler) and what must not (the feature array, which is paged in and out, never loaded whole).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def one(images: int, per_image: int, workdir: Path) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from captioner.config import ModelConfig, TrainConfig
    from captioner.data.dataset import BucketBatchSampler, CaptionDataset, Collate
    from captioner.data.records import Record
    from captioner.data.vocab import Vocabulary
    from captioner.model.decoder import CaptionDecoder
    from captioner.train.step import train_one_epoch

    rng = np.random.default_rng(0)
    path = workdir / f"features-{images}.npy"
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(images, 1280))
    for start in range(0, images, 10_000):  # written in slices: never the whole array in memory
        feats[start:start + 10_000] = rng.standard_normal((min(10_000, images - start), 1280), dtype=np.float32)
    feats.flush()
    del feats
    array = np.load(path, mmap_mode="r")

    words = [f"w{i}" for i in range(3000)]
    vocab = Vocabulary.build(words * 5, min_count=1)
    records = [Record(Path(f"/img/{i}.jpg"),
                      tuple(" ".join(rng.choice(words, size=rng.integers(8, 16))) for _ in range(per_image)),
                      "train") for i in range(images)]
    dataset = CaptionDataset(records, vocab, np.arange(images), max_len=20)
    del records  # the dataset keeps compact arrays; the Python records were only the reader's output
    model = CaptionDecoder(ModelConfig(embed_dim=64, hidden_dim=64, dropout=0.0), len(vocab), 1280)
    cfg = TrainConfig(batch_size=512, lr=1e-3, warmup_steps=10)
    sampler = BucketBatchSampler(dataset.lengths, cfg.batch_size, torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(dataset, array, vocab.pad_id))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gc.collect()
    sampler_thread = RssSampler()
    start = time.perf_counter()
    with sampler_thread:
        loss, steps = train_one_epoch(model, loader, opt, cfg, 0, len(sampler), torch.device("cpu"), vocab.pad_id)
    return {"images": images, "captions": len(dataset), "steps": steps, "loss": loss,
            "seconds": time.perf_counter() - start, "epoch_peak_mib": sampler_thread.peak / 1024,
            "file_peak_mib": sampler_thread.file_peak / 1024,
            "lifetime_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class RssSampler(threading.Thread):
    """Samples this process's anonymous resident memory every 20 ms while the epoch runs.

    RssAnon is memory the process owns. Pages of the memory-mapped feature file that an epoch touches are
    counted under RssFile instead: page cache the kernel can drop at any time, not memory that grows.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = self.file_peak = 0
        self.done = threading.Event()

    @staticmethod
    def rss_kib(field: str = "RssAnon:") -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        return 0

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.rss_kib())
            self.file_peak = max(self.file_peak, self.rss_kib("RssFile:"))

    def __enter__(self):
        self.peak = self.rss_kib()
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=113_000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--ratio", type=int, default=10)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.captions_per_image, Path(args.workdir))))
        return
    print(f"{'images':>8}{'captions':>10}{'steps':>7}{'seconds':>9}{'epoch peak anon MiB':>21}"
          f"{'mapped file MiB':>17}{'lifetime peak RSS MiB':>23}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in (args.images // args.ratio, args.images):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--workdir", tmp,
                                  "--captions-per-image", str(args.captions_per_image)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            print(f"{r['images']:>8}{r['captions']:>10}{r['steps']:>7}{r['seconds']:>9.1f}"
                  f"{r['epoch_peak_mib']:>21.0f}{r['file_peak_mib']:>17.0f}{r['lifetime_peak_mib']:>23.0f}")
    print(f"epoch peak anonymous memory ratio (large / small): {rows[1]['epoch_peak_mib'] / rows[0]['epoch_peak_mib']:.2f} "
          f"for {args.ratio}x the data (lifetime peaks include building the synthetic records)")


if __name__ == "__main__":
    main()
