"""Where the math runs: a device name ("auto", "cpu", "cuda", "cuda:N") -> a torch.device."""

from __future__ import annotations

import torch

from captioner.choices import DEVICES  # noqa: F401 (the names resolve_device takes, besides "cuda:N")
from captioner.errors import CaptionerError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (CUDA when there is a GPU, else the CPU), "cpu", "cuda" (or "cuda:N"), or a torch.device."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CaptionerError(f"device {name!r} asked for, but no CUDA device is available (use cpu or auto)")
        return torch.device(name)
    raise CaptionerError(f"unknown device {name!r} (expected auto, cpu or cuda)")
