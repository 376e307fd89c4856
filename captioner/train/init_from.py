"""Fine-tuning a trained model on new data: `captioner train --init-from flickr8k --data DIR`.

The model given (a checkpoint file, or a shipped model's name) brings its architecture, its weights, its
vocabulary and its encoder: the config's model section and the encoder's name, flip_average, pooling and
tags are replaced by the model's own, with one line saying which keys changed. The training settings come from
`--config`, or, without one, from the config the model was trained with (when it stores one). The source is
recorded as train.init_from in the run's config, so that `--resume` before the first checkpoint starts from
it again (after that, last.pt holds the weights).

New words. The new training captions' words that reach data.min_count and that the model's vocabulary lacks
are appended to it (`extend_vocabulary`): every old word keeps its id and its rows, and each new word gets an
embedding row and an output row (weights and bias) chosen by train.new_words (`grow_rows`):
- "unk": the rows of <unk>, so that each new word starts where the model put the words it did not know,
  as likely as <unk> was there (<unk> itself is never emitted);
- "mean": the mean of the old words' rows, the output bias that of a rare old word (the 10th percentile of
  the old words' biases);
- "off": the vocabulary stays the model's own and new words train as <unk>.
With train.new_words_lr_scale above 1, the new rows take steps that many times the others' in the
cross-entropy epochs (`boost_new_rows`), as a new layer gets a learning rate of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from captioner import checkpoint, pretrained
from captioner.config import Config, from_dict, load_config, parse_overrides, validate
from captioner.data.records import Record
from captioner.data.vocab import SPECIALS, Vocabulary, tokenize
from captioner.errors import CaptionerError
from captioner.vision.encoders import feature_differences

log = logging.getLogger("captioner")

# The encoder settings that define the image vector, which the model's weights were trained on; the other
# encoder keys (batch_size, num_workers, fine_tune, ...) are training settings and come from the config.
ENCODER_KEYS = ("name", "flip_average", "pooling", "tags")
# Keys of a stored config that describe the machine it ran on, not how to train.
_MACHINE_KEYS = {"data": ("root", "cache_dir"), "train": ("init_from",)}


def source_path(init_from: str) -> Path:
    """A checkpoint file, or a shipped model's name, as the file to read."""
    try:
        return pretrained.resolve_one(init_from)
    except CaptionerError as err:
        raise CaptionerError(f"--init-from {err}") from None


def recorded_name(init_from: str) -> str:
    """What the run's config records: a shipped model's name as given, a file as its absolute path."""
    path = Path(init_from).expanduser()
    return str(path.resolve()) if path.is_file() else init_from


def stored_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The config a checkpoint was trained with: a training checkpoint's own, an exported model's provenance."""
    raw = ckpt.get("config")
    if raw is None and isinstance(ckpt.get(checkpoint.PROVENANCE), dict):
        raw = ckpt[checkpoint.PROVENANCE].get("config")
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
    asked = {k: getattr(cfg.encoder, k) for k in ENCODER_KEYS}
    differs = [f"encoder.{d}" for d in feature_differences(spec, asked, keys=ENCODER_KEYS)]
    if differs:
        raise CaptionerError(f"{path}: trained on other image features than the config asks for (checkpoint vs "
                             f"config): {'; '.join(differs)}")
    if loaded.encoder_state is not None:
        raise CaptionerError(f"{path}: carries fine-tuned encoder weights; starting from such a model is not "
                             "supported (start from a model trained on a frozen encoder)")
    return loaded


def extend_vocabulary(vocab: Vocabulary, train: list[Record], min_count: int) -> tuple[Vocabulary, list[str]]:
    """The model's vocabulary with the training captions' words that reach `min_count` and that it lacks
    appended (most frequent first, as Vocabulary.build orders them), and those words. Old ids are unchanged."""
    built = Vocabulary.build((c for r in train for c in r.captions), min_count=min_count)
    added = [w for w in built.words if w not in vocab]
    return Vocabulary(vocab.words + tuple(added)), added


# The output bias a new word starts with under "mean": this quantile of the old words' biases, a rare word's.
RARE_BIAS_QUANTILE = 0.1


def grow_rows(state: dict[str, torch.Tensor], vocab: Vocabulary, n_new: int, how: str) -> dict[str, torch.Tensor]:
    """A decoder's weights (`state`, for `vocab`) with `n_new` rows appended to the embedding and to the
    output layer's weights and bias, started as `how` says (the module docstring); the old rows unchanged."""
    if n_new == 0:
        return dict(state)
    words = slice(len(SPECIALS), None)  # real words: the specials' rows are no word's
    grown = dict(state)
    for name in ("embed.weight", "out.weight", "out.bias"):
        old = state[name]
        if how == "unk":
            row = old[vocab.unk_id]
        elif name == "out.bias":
            row = torch.quantile(old[words].float(), RARE_BIAS_QUANTILE).to(old.dtype)
        else:
            row = old[words].mean(dim=0)
        grown[name] = torch.cat([old, row.expand(n_new, *old.shape[1:]).clone()])
    return grown


def boost_new_rows(optimizer: torch.optim.Optimizer, model: torch.nn.Module, first: int, scale: float) -> None:
    """Make every step of `optimizer` move the rows from id `first` on of the decoder's embedding and output
    layer (weights and bias) `scale` times as far as it would (a learning rate of their own, as a new layer
    gets one: they start from scratch while the rest is only adjusted). The other rows' steps are untouched."""
    tensors = list({id(t): t for t in (model.embed.weight, model.out.weight, model.out.bias)}.values())
    before: list[torch.Tensor] = []

    def remember(*_: Any) -> None:
        before[:] = [t.detach()[first:].clone() for t in tensors]

    @torch.no_grad()
    def stretch(*_: Any) -> None:
        for t, old in zip(tensors, before):
            t[first:] = old + scale * (t[first:] - old)

    if scale != 1.0:
        optimizer.register_step_pre_hook(remember)
        optimizer.register_step_post_hook(stretch)


def report_new_words(train: list[Record], vocab: Vocabulary, added: list[str], source: str,
                     min_count: int, extended: bool = True) -> dict[str, Any]:
    """One line: how many words the vocabulary gained, and how many caption words of the new training data
    it still lacks (those train as <unk>). `vocab` is the vocabulary training uses (the model's own, extended
    by `added`)."""
    counts = Counter(w for r in train for c in r.captions for w in tokenize(c))
    unknown = Counter({w: n for w, n in counts.items() if w not in vocab})
    total, missing = sum(counts.values()), sum(unknown.values())
    share = 100.0 * missing / total if total else 0.0
    shown = ", ".join(added[:5])
    rest = ", ".join(w for w, _ in unknown.most_common(3))
    if added:
        gained = (f"added {len(added)} words to {source}'s vocabulary of {len(vocab) - len(added)} (those of the "
                  f"training captions seen at least {min_count} times (data.min_count) that it lacked"
                  f"{': ' + shown + (', ...' if len(added) > 5 else '') if shown else ''}); ")
    else:
        why = f"none of its missing words is seen {min_count} times" if extended else "train.new_words = off"
        gained = f"added no word to {source}'s vocabulary of {len(vocab)} ({why}); "
    log.info("%s%d of the %d caption words of the training images (%.1f%%) remain unknown: %d distinct words%s; "
             "they train as <unk>", gained, missing, total, share, len(unknown),
             f" (most frequent: {rest})" if rest else "")
    return {"added": len(added), "tokens": total, "unknown_tokens": missing, "unknown_words": len(unknown),
            "percent": share}
