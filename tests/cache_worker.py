"""A feature extraction in a process of its own, for the cache's kill and concurrency tests.

    python tests/cache_worker.py CACHE IMAGE... [--kill-after N] [--delay S] [--ready FILE --wait-for FILE]

Runs extract_features with a tiny deterministic encoder (batches of 2, commits every 4 images).
--kill-after N: SIGKILL itself when the encoder is handed its N-th image (no cleanup runs).
--delay S: sleep S seconds per batch, so that two processes' commits interleave.
--ready / --wait-for: touch one file, then wait for the other process's, so both extract at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

from captioner.vision.encoders import Encoder, EncoderSpec
from captioner.vision.features import extract_features

SPEC = EncoderSpec(name="tiny", weights="none", image_size=16, resize=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                   feature_dim=4, interpolation="bilinear")
BATCH, CHUNK = 2, 4


class TinyEncoder(Encoder):
    """Mean colour per channel plus brightness; counts its images, and can kill or slow its process."""

    def __init__(self, kill_after: int = 0, delay: float = 0.0):
        super().__init__()
        self.spec, self.classifier = SPEC, None
        self.transform = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.images_seen, self.kill_after, self.delay = 0, kill_after, delay

    def forward_grid(self, x):
        self.images_seen += x.shape[0]
        if self.kill_after and self.images_seen >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1) * self.scale

    def stages(self):
        return []


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cache", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--ready", type=Path)
    p.add_argument("--wait-for", type=Path)
    args = p.parse_args()
    if args.ready:
        args.ready.touch()
    deadline = time.monotonic() + 120
    while args.wait_for and not args.wait_for.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    store = extract_features(TinyEncoder(args.kill_after, args.delay), args.images, args.cache,
                             batch_size=BATCH, num_workers=0, progress=False, chunk_size=CHUNK)
    print(len(store))


if __name__ == "__main__":
    sys.exit(main())
