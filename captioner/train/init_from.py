"""Fine-tuning a trained model on new data: `captioner train --init-from flickr8k --data DIR`.

The model given (a checkpoint file, or a shipped model's name) brings its architecture, its weights, its
vocabulary and its encoder: the config's model section and the encoder's name, flip_average, pooling and
tags are replaced by the model's own, with one line saying which keys changed. The training settings come from
`--config`, or, without one, from the config the model was trained with (when it stores one). The source is
recorded as train.init_from in the run's config, so that `--resume` before the first checkpoint starts from
it again (after that, last.pt holds the weights).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from captioner import checkpoint
from captioner.config import Config, from_dict, load_config, parse_overrides, validate
from captioner.data.records import Record
from captioner.data.vocab import Vocabulary, tokenize
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

# The encoder settings that define the image vector, which the model's weights were trained on; the other
# encoder keys (batch_size, num_workers, fine_tune, ...) are training settings and come from the config.
ENCODER_KEYS = ("name", "flip_average", "pooling", "tags")
# Keys of a stored config that describe the machine it ran on, not how to train.
_MACHINE_KEYS = {"data": ("root", "cache_dir"), "train": ("init_from",)}


def source_path(init_from: str) -> Path:
    """A checkpoint file, or a shipped model's name, as the file to read."""
    try:
        return checkpoint.pretrained_path(init_from)
    except CaptionerError as err:
        raise CaptionerError(f"--init-from {err}") from None


def recorded_name(init_from: str) -> str:
    """What the run's config records: a shipped model's name as given, a file as its absolute path."""
    path = Path(init_from).expanduser()
    return str(path.resolve()) if path.is_file() else init_from


def stored_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The config a checkpoint was trained with: a training checkpoint's own, an exported model's provenance."""
    raw = ckpt.get("config")
    if raw is None and isinstance(ckpt.get("provenance"), dict):
        raw = ckpt["provenance"].get("config")
    return raw if isinstance(raw, dict) else None


def _settings_of(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config's sections, without what names its machine, and without keys this version does not
    know (a newer captioner may have added some): defaults for another run, not a run to repeat exactly."""
    known = {f.name: {g.name for g in dataclasses.fields(getattr(Config(), f.name))}
             for f in dataclasses.fields(Config)}
    out = {}
    for section, values in raw.items():
        if section in known and isinstance(values, dict):
            drop = _MACHINE_KEYS.get(section, ())
            out[section] = {k: v for k, v in values.items() if k in known[section] and k not in drop}
    return out


def init_config(config: str | None, overrides: list[str], init_from: str) -> Config:
    """The config of a run that starts from `init_from`: the training settings of `config` (or of the
    model's own stored config, or the defaults), `overrides` on top, and the model's architecture."""
    path = source_path(init_from)
    ckpt = checkpoint.read(path)
    loaded = checkpoint.build_model(ckpt, path)
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        stored = stored_config(ckpt)
        base = Config()
        if stored is not None:
            try:
                base = from_dict(_settings_of(stored))
            except CaptionerError as err:
                raise CaptionerError(f"{path}: its stored config: {err}") from None
            log.info("training settings from %s's own config (pass --config to choose others)", init_from)
        else:
            log.info("%s stores no training config: the defaults apply (pass --config to choose)", init_from)
        cfg = validate(from_dict(parse_overrides(overrides), base))

    spec = loaded.encoder_spec()
    model_cfg = loaded.model.cfg
    wanted = {**{f"model.{f.name}": getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)},
              **{f"encoder.{k}": getattr(spec, k) for k in ENCODER_KEYS}}
    have = {**{f"model.{f.name}": getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)},
            **{f"encoder.{k}": getattr(cfg.encoder, k) for k in ENCODER_KEYS}}
    asked = {f"{section}.{key}" for section, values in parse_overrides(overrides).items() for key in values}
    clash = [k for k in wanted if k in asked and have[k] != wanted[k]]
    if clash:
        raise CaptionerError(f"--set {clash[0]}={have[clash[0]]}: the architecture comes from --init-from "
                             f"{init_from} ({clash[0]} = {wanted[clash[0]]}); drop it, or train from scratch")
    differs = [f"{k} {have[k]} -> {wanted[k]}" for k in wanted if have[k] != wanted[k]]
    if differs and config is not None:
        log.info("--init-from %s: its model and encoder replace those of %s (%s)", init_from, config,
                 ", ".join(differs))
    encoder = dataclasses.replace(cfg.encoder, **{k: getattr(spec, k) for k in ENCODER_KEYS})
    train = dataclasses.replace(cfg.train, init_from=recorded_name(init_from))
    return validate(dataclasses.replace(cfg, model=model_cfg, encoder=encoder, train=train))


def load_init(cfg: Config) -> checkpoint.LoadedModel:
    """The model a run starts from (cfg.train.init_from), refused when its architecture is not the config's."""
    path = source_path(cfg.train.init_from)
    loaded = checkpoint.build_model(checkpoint.read(path), path, expected=cfg.model)
    spec = loaded.encoder_spec()
    differs = [f"encoder.{k}: {getattr(spec, k)} vs {getattr(cfg.encoder, k)}" for k in ENCODER_KEYS
               if getattr(spec, k) != getattr(cfg.encoder, k)]
    if differs:
        raise CaptionerError(f"{path}: trained on other image features than the config asks for (checkpoint vs "
                             f"config): {'; '.join(differs)}")
    if loaded.encoder_state is not None:
        raise CaptionerError(f"{path}: carries fine-tuned encoder weights; starting from such a model is not "
                             "supported (start from a model trained on a frozen encoder)")
    return loaded


def report_unknown_words(train: list[Record], vocab: Vocabulary, source: str) -> dict[str, Any]:
    """One line: how many caption words of the new training data the model's vocabulary lacks."""
    counts = Counter(w for r in train for c in r.captions for w in tokenize(c))
    unknown = Counter({w: n for w, n in counts.items() if w not in vocab})
    total, missing = sum(counts.values()), sum(unknown.values())
    share = 100.0 * missing / total if total else 0.0
    shown = ", ".join(w for w, _ in unknown.most_common(5))
    log.info("%d of the %d caption words of the training images (%.1f%%) are not in %s's vocabulary of %d "
             "words: %d distinct words%s; they train as <unk>", missing, total, share, source, len(vocab),
             len(unknown), f" (most frequent: {shown})" if shown else "")
    return {"tokens": total, "unknown_tokens": missing, "unknown_words": len(unknown), "percent": share}
