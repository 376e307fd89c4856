"""Configuration: dataclasses with defaults, then a TOML file, then `--set section.key=value` overrides.

The resolved config is an immutable value passed explicitly; nothing edits it at run time. Unknown or
misspelt keys are errors that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.choices import CELLS, CONDITIONING, DEFAULT_PRECISION, DEVICES, POOLINGS, PRECISIONS
from captioner.errors import CaptionerError

SELECT_METRICS = ("CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "loss")
DATA_FORMATS = ("auto", "flickr", "kaggle", "karpathy", "coco", "imagefolder")
NEW_WORDS = ("unk", "mean", "off")  # how a fine-tuned model's new words start (captioner.train.init_from)


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # dataset root; the --data flag sets it
    format: str = "auto"  # flickr | kaggle | karpathy | coco | imagefolder | auto (detected)
    min_count: int = 5  # words seen fewer times in train become <unk>
    max_len: int = 20  # captions longer than this many words are truncated for training
    strict: bool = False  # missing images / malformed lines are errors instead of counted skips
    cache_dir: str = "cache"  # feature cache
    # A dataset without a val split gives this fraction of its training images (at least one) as dev,
    # chosen by image from holdout_seed and the images' paths (captioner/data/holdout.py); 0: no holdout.
    holdout: float = 0.05
    holdout_seed: int = 0


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "efficientnet_lite0"
    batch_size: int = 64
    num_workers: int = 2
    fine_tune: int = 0  # train the encoder's last N blocks too (images go through the CNN; no cache)
    fine_tune_lr_scale: float = 0.1  # the encoder's learning rate as a fraction of train.lr
    flip_average: bool = False  # v = mean of f(image) and f(mirrored image); cached apart from plain v
    pooling: str = "mean"  # the last grid -> v: mean | max | meanmax (both concatenated); cached apart
    tags: bool = False  # v ends with the ImageNet tag words' probabilities (captioner.vision.tags); cached apart


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's architecture. Saved in every checkpoint so the model rebuilds with no flags."""

    cell: str = "lstm"  # rnn (tanh) | lstm | gru
    conditioning: str = "inject"  # inject: W_ih v at every step | init: h_0 from v | both
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    tie_weights: bool = False  # share the embedding and output matrices (needs embed_dim == hidden_dim)
    highway: bool = False  # highway connections between stacked layers: y = T*H(x) + C*x
    highway_coupled: bool = True  # C = 1 - T; false: a separate carry gate
    highway_bias: float = -2.0  # transform-gate bias at init: negative, so deep stacks start by carrying


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    grad_clip: float = 5.0  # max gradient norm
    label_smoothing: float = 0.0
    patience: int = 5  # cross-entropy epochs without improvement of select_metric before that phase ends
    select_metric: str = "CIDEr"  # dev metric that picks the best checkpoint
    eval_max_len: int = 20  # longest caption decoded on dev
    eval_images: int = 0  # decode only this many dev images each epoch (0: all)
    tbptt: int = 0  # truncated BPTT: backpropagate through chunks of this many steps (0: full BPTT)
    scheduled_sampling: float = 0.0  # final chance that an input word is the model's own draw (ramped from 0)
    scst_epochs: int = 0  # self-critical epochs (CIDEr-D reward) after the cross-entropy epochs
    scst_lr: float = 5e-5
    scst_samples: int = 5  # captions sampled per image
    scst_baseline: str = "greedy"  # greedy: the greedy caption's reward (Rennie et al.) | mean: other samples'
    scst_batch_size: int = 50  # images per SCST step
    # What SCST starts from: best, the cross-entropy epoch with the best dev score (a noisy early peak can
    # pick an under-trained model); last, the last cross-entropy epoch, where the schedule has run out.
    scst_start: str = "best"
    # SCST epochs without improvement before the phase ends (0: run them all). Greedy dev CIDEr is noisy from
    # one SCST epoch to the next, so by default the phase runs out and best.pt keeps its best epoch.
    scst_patience: int = 0
    # Fixes for SCST's bad endings ("... playing with a blue"); the defaults leave the reward and loss as above.
    scst_reward_end: bool = False  # CIDEr-D counts <end> as a word, so "grass <end>" earns and "a <end>" not
    scst_end_weight: float = 1.0  # weight of the <end> token's term in the policy-gradient loss
    scst_bad_ending_penalty: float = 0.0  # subtracted from the reward of a caption that ends badly
    scst_repeat_penalty: float = 0.0  # subtracted from the reward of a caption with a word twice in a row
    seed: int = 0
    # Start from this model's weights, vocabulary and encoder: a checkpoint file or a shipped model's name
    # (`captioner train --init-from`, which also takes the architecture from it); "": from scratch.
    init_from: str = ""
    # With init_from: the new data's words that reach data.min_count join the model's vocabulary, their rows
    # started from <unk>'s (unk) or the old words' mean (mean); off: new words train as <unk>
    # (captioner.train.init_from).
    new_words: str = "unk"
    # The new words' rows (embedding, output weights and bias) take steps this many times larger than the
    # other weights' in the cross-entropy epochs (1: the same). On coco-dev 10 made them used on training
    # photos but on no held-out one, and cost CIDEr (docs/results.md), so the default is 1.
    new_words_lr_scale: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = DEFAULT_PRECISION  # auto (bf16 where the CPU/GPU has native bf16, else fp32) | fp32 | bf16


@dataclass(frozen=True)
class EnsembleConfig:
    # Train this many models by one command, one after another, member i with train.seed + i - 1 and
    # everything else the same (captioner.train.ensemble); decoded together they average their next-word
    # probabilities (captioner.model.ensemble). 1: one model, the usual run.
    members: int = 1


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


def validate(cfg: Config) -> Config:
    """Reject values no run could use, naming the key."""
    m, t, d = cfg.model, cfg.train, cfg.data
    checks = [
        (m.cell in CELLS, f"model.cell must be one of {', '.join(CELLS)}, got {m.cell!r}"),
        (m.conditioning in CONDITIONING,
         f"model.conditioning must be one of {', '.join(CONDITIONING)}, got {m.conditioning!r}"),
        (m.embed_dim > 0, f"model.embed_dim must be positive, got {m.embed_dim}"),
        (m.hidden_dim > 0, f"model.hidden_dim must be positive, got {m.hidden_dim}"),
        (m.num_layers > 0, f"model.num_layers must be positive, got {m.num_layers}"),
        (0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (not m.tie_weights or m.embed_dim == m.hidden_dim,
         "model.tie_weights needs model.embed_dim == model.hidden_dim"),
        (t.epochs > 0, f"train.epochs must be positive, got {t.epochs}"),
        (t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}"),
        (t.lr > 0, f"train.lr must be positive, got {t.lr}"),
        (t.grad_clip > 0, f"train.grad_clip must be positive, got {t.grad_clip}"),
        (0.0 <= t.label_smoothing < 1.0, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}"),
        (t.schedule in ("cosine", "constant"), f"train.schedule must be cosine or constant, got {t.schedule!r}"),
        (t.tbptt >= 0, f"train.tbptt must be 0 (off) or positive, got {t.tbptt}"),
        (0.0 <= t.scheduled_sampling <= 1.0,
         f"train.scheduled_sampling must be in [0, 1], got {t.scheduled_sampling}"),
        (t.scst_epochs >= 0, f"train.scst_epochs must be 0 (off) or positive, got {t.scst_epochs}"),
        (t.scst_lr > 0 and math.isfinite(t.scst_lr), f"train.scst_lr must be positive, got {t.scst_lr}"),
        (t.patience >= 0, f"train.patience must be 0 (off) or more, got {t.patience}"),
        (t.scst_patience >= 0, f"train.scst_patience must be 0 (off) or more, got {t.scst_patience}"),
        (t.scst_samples >= 1, f"train.scst_samples must be at least 1, got {t.scst_samples}"),
        (t.scst_start in ("best", "last"), f"train.scst_start must be best or last, got {t.scst_start!r}"),
        (t.scst_baseline in ("greedy", "mean"), f"train.scst_baseline must be greedy or mean, got {t.scst_baseline!r}"),
        (t.scst_baseline != "mean" or t.scst_samples >= 2, "train.scst_baseline = \"mean\" needs scst_samples >= 2"),
        (t.scst_batch_size > 0, f"train.scst_batch_size must be positive, got {t.scst_batch_size}"),
        (0.0 <= t.scst_end_weight < math.inf, f"train.scst_end_weight must be 0 or more, got {t.scst_end_weight}"),
        (0.0 <= t.scst_bad_ending_penalty < math.inf,
         f"train.scst_bad_ending_penalty must be 0 (off) or more, got {t.scst_bad_ending_penalty}"),
        (0.0 <= t.scst_repeat_penalty < math.inf,
         f"train.scst_repeat_penalty must be 0 (off) or more, got {t.scst_repeat_penalty}"),
        (t.scst_epochs == 0 or cfg.encoder.fine_tune == 0,
         "train.scst_epochs needs a frozen encoder (encoder.fine_tune = 0): SCST trains the decoder on cached features"),
        (t.eval_max_len > 0, f"train.eval_max_len must be positive, got {t.eval_max_len}"),
        (t.new_words in NEW_WORDS, f"train.new_words must be one of {', '.join(NEW_WORDS)}, got {t.new_words!r}"),
        (t.new_words_lr_scale > 0 and math.isfinite(t.new_words_lr_scale),
         f"train.new_words_lr_scale must be positive, got {t.new_words_lr_scale}"),
        (t.device in DEVICES, f"train.device must be auto, cpu or cuda, got {t.device!r}"),
        (t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}"),
        (cfg.encoder.fine_tune >= 0, f"encoder.fine_tune must be 0 (frozen) or positive, got {cfg.encoder.fine_tune}"),
        (cfg.encoder.pooling in POOLINGS,
         f"encoder.pooling must be one of {', '.join(POOLINGS)}, got {cfg.encoder.pooling!r}"),
        (not (cfg.encoder.tags and cfg.encoder.pooling == "max"),
         "encoder.tags needs the mean-pooled v: use encoder.pooling mean or meanmax"),
        (cfg.encoder.batch_size > 0, f"encoder.batch_size must be positive, got {cfg.encoder.batch_size}"),
        (cfg.encoder.num_workers >= 0, f"encoder.num_workers must be 0 or more, got {cfg.encoder.num_workers}"),
        (math.isfinite(t.lr), f"train.lr must be finite, got {t.lr}"),
        (t.weight_decay >= 0, f"train.weight_decay must be 0 or more, got {t.weight_decay}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be 0 or more, got {t.warmup_steps}"),
        (t.select_metric in SELECT_METRICS,
         f"train.select_metric must be one of {', '.join(SELECT_METRICS)}, got {t.select_metric!r}"),
        (t.eval_images >= 0, f"train.eval_images must be 0 (all) or more, got {t.eval_images}"),
        (d.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}, got {d.format!r}"),
        (d.min_count > 0, f"data.min_count must be positive, got {d.min_count}"),
        (d.max_len > 0, f"data.max_len must be positive, got {d.max_len}"),
        (0.0 <= d.holdout < 1.0, f"data.holdout must be in [0, 1), got {d.holdout}"),
        (cfg.ensemble.members >= 1, f"ensemble.members must be at least 1, got {cfg.ensemble.members}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CaptionerError(message)
    return cfg


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(valid)})"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a TOML value (or a string from --set) against a dataclass field type."""
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "bool": bool, "str": str}[typ]
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        try:
            if typ is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return typ(value)
        except ValueError:
            raise CaptionerError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool):
        raise CaptionerError(f"{key}: expected {typ.__name__}, got {value!r}")
    if not isinstance(value, typ):
        raise CaptionerError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(section_obj: Any, updates: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    changes = {}
    for key, value in updates.items():
        if key not in fields:
            raise CaptionerError(f"unknown config key {prefix}{key}{_closest(key, list(fields))}")
        changes[key] = _coerce(value, fields[key].type, prefix + key)
    return dataclasses.replace(section_obj, **changes)


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a nested {section: {key: value}} mapping on top of `base` (defaults when None)."""
    cfg = base or Config()
    sections = {f.name for f in dataclasses.fields(Config)}
    changes = {}
    for section, values in raw.items():
        if section not in sections:
            raise CaptionerError(f"unknown config section {section!r}{_closest(section, sorted(sections))}")
        if not isinstance(values, dict):
            raise CaptionerError(f"config section {section!r} must be a table")
        changes[section] = _merge(getattr(cfg, section), values, f"{section}.")
    return dataclasses.replace(cfg, **changes)


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """['model.cell=gru', 'train.lr=1e-3'] -> {'model': {'cell': 'gru'}, 'train': {'lr': '1e-3'}}."""
    nested: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise CaptionerError(f"--set expects section.key=value, got {item!r}")
        nested.setdefault(section, {})[name] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the config `path` (a file, or the name of an installed config: see `find_config`),
    then `--set` overrides; validated.

    A config file may start from another one: `base = "flickr8k"` (a name or a path relative to the file)
    applies that config first, so a variant holds only what it changes.
    """
    cfg = Config()
    if path is not None:
        cfg = from_dict(_read_layers(find_config(path), []), cfg)
    if overrides:
        cfg = from_dict(parse_overrides(overrides), cfg)
    return validate(cfg)


def _read_layers(path: Path, seen: list[Path]) -> dict[str, Any]:
    """The file's tables merged over those of its `base` chain, base first."""
    if path in seen:
        raise CaptionerError(f"{path}: config bases form a circle ({' -> '.join(p.name for p in seen + [path])})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CaptionerError(f"{path}: not a valid TOML file ({err})") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise CaptionerError(f"{path}: base must be a config name or path, got {base!r}")
    beside = path.parent / base
    merged = _read_layers(beside if beside.is_file() else find_config(base), seen + [path])
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def configs_folder() -> Path:
    """The configs shipped with the package: the top-level configs/ folder, which an install places at
    captioner/configs (pyproject.toml maps it in); a checkout or editable install reads the folder itself."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def available_configs() -> list[str]:
    """Names `find_config` accepts: 'flickr8k', 'tiny', 'levers/gru', ..."""
    root = configs_folder()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.toml"))


def find_config(name_or_path: str | Path) -> Path:
    """A config file by path, or by the name of an installed config ('flickr8k', 'levers/gru.toml')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".toml")
    for prefix in ("", "configs/"):  # `--config configs/tiny.toml` also works away from a checkout
        shipped = configs_folder() / f"{name.removeprefix(prefix)}.toml"
        if name.startswith(prefix) and shipped.is_file():
            return shipped
    names = available_configs()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CaptionerError(f"{name_or_path}: config file not found, nor an installed config of that name{hint}; "
                         f"the installed configs are: {', '.join(names)}")


def config_name(name_or_path: str | Path) -> str:
    """What a run started from this config is called by default: the file's stem."""
    return Path(name_or_path).stem


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Write the resolved config back as TOML (flat tables of scalars only)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig stored in a checkpoint; keys a newer version added get their defaults."""
    return _merge(ModelConfig(), raw, "model.")

