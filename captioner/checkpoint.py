"""Checkpoints: one versioned dict, written atomically, loaded without running code.

A checkpoint rebuilds its model with no training flags: it holds the model config, the vocabulary, the
encoder's spec (name, weights, preprocessing), the feature size and the weights. Training checkpoints
add the optimizer, scheduler, step and RNG states so that a resumed run ends where an uninterrupted one
would. Loading always uses `weights_only=True`: a pickle that would run code is refused.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from captioner.config import ModelConfig, model_config_from_dict
from captioner.data.vocab import Vocabulary
from captioner.decoder import CaptionDecoder
from captioner.errors import CaptionerError

FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: CaptionDecoder
    vocab: Vocabulary
    encoder: dict[str, Any]  # the EncoderSpec as a dict: name, weights, preprocessing
    checkpoint: dict[str, Any]  # everything else that was stored (step, metrics, config, ...)


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def model_payload(model: CaptionDecoder, vocab: Vocabulary, encoder_spec: dict[str, Any],
                  half: bool = False) -> dict[str, Any]:
    """What any checkpoint needs to rebuild the model; `half` stores float16 weights (shipping)."""
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "model_config": asdict(model.cfg),
        "vocab": vocab.to_dict(),
        "feature_dim": model.feature_dim,
        "encoder": dict(encoder_spec),
        "model": state,
    }


def read(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely, with one-line errors for every way a file can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        raise CaptionerError(f"{path}: refused to load: not a plain-tensor checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CaptionerError(f"{path}: not a readable checkpoint (truncated or corrupt: {err})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CaptionerError(f"{path}: not a captioner checkpoint (no format_version)")
    version = ckpt["format_version"]
    if version > FORMAT_VERSION:
        raise CaptionerError(f"{path}: checkpoint format {version} is newer than this captioner "
                             f"understands ({FORMAT_VERSION}); upgrade captioner")
    missing = [k for k in ("model_config", "vocab", "feature_dim", "encoder", "model") if k not in ckpt]
    if missing:
        raise CaptionerError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def build_model(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> LoadedModel:
    """Rebuild the decoder from a checkpoint dict and load its weights (as float32)."""
    cfg: ModelConfig = model_config_from_dict(ckpt["model_config"])
    vocab = Vocabulary.from_dict(ckpt["vocab"])
    model = CaptionDecoder(cfg, vocab_size=len(vocab), feature_dim=int(ckpt["feature_dim"]),
                           pad_id=vocab.pad_id)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    load_state(model, state, path)
    return LoadedModel(model.eval(), vocab, ckpt["encoder"], ckpt)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with a message that says what differs instead of a wall of key names."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise CaptionerError(f"{path}: weights do not fit the model it describes: {'; '.join(parts)}")
    model.load_state_dict(state)


def load_model(path: str | Path) -> LoadedModel:
    return build_model(read(path), path)
