"""Checkpoints: one versioned dict, written atomically, loaded without running code.

A checkpoint rebuilds its model with no training flags: it holds the model config, the vocabulary, the
encoder's spec (name, weights, preprocessing), the feature size and the weights. Training checkpoints
add the optimizer, scheduler, step and RNG states so that a resumed run ends where an uninterrupted one
would. Loading always uses `weights_only=True`: a pickle that would run code is refused.

Format versions (`format_version` in the dict; `read` migrates older ones in memory):
    0  the unversioned layout: no `format_version` key, the vocabulary stored as a plain list of words
    1  `format_version` added; the vocabulary as `Vocabulary.to_dict()` (its words with a format tag)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from captioner import pretrained
from captioner.atomic import atomic_write, remove_stale_temps
from captioner.config import Config, ModelConfig, model_config_from_dict, validate
from captioner.data.holdout import Holdout
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder
from captioner.model.ensemble import Ensemble
from captioner.model.neighbours import SUFFIX as INDEX_SUFFIX, index_path
from captioner.no_init import without_random_init
from captioner.vision.encoders import EncoderSpec, feature_differences
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

FORMAT_VERSION = 1

# The largest decoder a checkpoint may describe, in bytes of float32 parameters: 2 GiB is 500 million
# parameters, some 200 times the shipped models (2.7 million), so only a damaged or hostile config reaches it.
# A machine with less memory gets half of what it has as the bound instead.
MAX_DECODER_BYTES = 2 * 1024**3

# The schema: every key a checkpoint may hold, named here and nowhere else.
# Every checkpoint: what rebuilds the model (model_payload).
MODEL_KEYS = ("model_config", "vocab", "feature_dim", "encoder", "model")
# A training checkpoint adds its TrainingState, whose fields are these (required to resume) and `metrics`.
TRAINING_KEYS = ("config", "optimizer", "epoch", "step", "best", "bad_epochs")
FORMAT = "format_version"  # written by `save`: see the format versions above
# Written only where they apply:
ENCODER_STATE = "encoder_state"  # a fine-tuned encoder's weights (encoder.fine_tune): training checkpoints
HOLDOUT = "holdout"  # the training images held out as dev (captioner.data.holdout.Holdout.to_dict()): any
NEW_WORDS_FROM = "new_words_from"  # the first id of the words a run from train.init_from added: training
PROVENANCE = "provenance"  # an exported model's source file, config, epoch, step, dev_metrics (export)


@dataclass
class LoadedModel:
    model: CaptionDecoder
    vocab: Vocabulary
    encoder: dict[str, Any]  # the EncoderSpec as stored: name, weights, preprocessing (see encoder_spec)
    checkpoint: dict[str, Any]  # the file's whole dict as stored, for provenance (step, metrics, config, ...)
    encoder_state: dict[str, torch.Tensor] | None = None  # a fine-tuned encoder's weights, else None
    members: tuple[LoadedModel, ...] = ()  # an ensemble's members as loaded (ensemble_of); () for one model

    def encoder_spec(self) -> EncoderSpec:
        """The stored spec as the dataclass (fields it predates at their defaults)."""
        return EncoderSpec.from_dict(self.encoder)

    def holdout(self, path: str | Path) -> Holdout | None:
        """The held-out dev images the model was selected on (None: it records none); `path` names the file
        in the error for a damaged record."""
        return recorded_holdout(self.checkpoint, path)

    @property
    def new_words_from(self) -> int | None:
        """The first id of the words its run added to the vocabulary of the model it started from."""
        return self.checkpoint.get(NEW_WORDS_FROM)


def recorded_holdout(ckpt: dict[str, Any], path: str | Path) -> Holdout | None:
    """A checkpoint dict's record of the held-out dev images (captioner.data.holdout), or None."""
    raw = ckpt.get(HOLDOUT)
    return Holdout.from_dict(raw, str(path)) if raw is not None else None


@dataclass
class TrainingState:
    """What a training checkpoint adds to its model, so that a resumed run ends where an uninterrupted
    one would."""

    config: dict[str, Any]  # the resolved Config (captioner.config.to_dict)
    optimizer: dict[str, Any]  # the optimizer's state_dict
    epoch: int  # epochs finished
    step: int  # optimisation steps taken
    best: float | None  # the best value of train.select_metric so far
    bad_epochs: int  # epochs since it improved
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # this epoch's dev metrics


def training_payload(model: CaptionDecoder, vocab: Vocabulary, encoder_spec: EncoderSpec,
                     state: TrainingState, encoder_state: dict[str, torch.Tensor] | None = None,
                     holdout: Holdout | None = None, new_words_from: int | None = None) -> dict[str, Any]:
    """The dict a training checkpoint stores: the model's payload plus the training state, and what applies
    of the fine-tuned encoder's weights, the held-out dev images and the first added word's id."""
    payload = {**model_payload(model, vocab, encoder_spec), **asdict(state)}
    optional = {ENCODER_STATE: encoder_state, HOLDOUT: holdout.to_dict() if holdout is not None else None,
                NEW_WORDS_FROM: new_words_from}
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def read_training(path: str | Path) -> tuple[LoadedModel, TrainingState]:
    """A training checkpoint's model and its training state (CaptionerError if it has none)."""
    ckpt = read(path, training=True)
    names = [f.name for f in dataclasses.fields(TrainingState)]
    return build_model(ckpt, path), TrainingState(**{k: ckpt[k] for k in names if k in ckpt})


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never half a checkpoint.

    A writer killed mid-save leaves only its `.NAME.*.tmp` file behind, never a damaged NAME; the next
    save of NAME removes such leftovers (one process writes a given checkpoint path at a time).
    """
    payload = {**payload, FORMAT: FORMAT_VERSION}
    remove_stale_temps(path)
    atomic_write(path, lambda f: torch.save(payload, f))


def model_payload(model: CaptionDecoder, vocab: Vocabulary, encoder_spec: EncoderSpec | dict[str, Any],
                  half: bool = False) -> dict[str, Any]:
    """What any checkpoint needs to rebuild the model; `half` stores float16 weights (shipping)."""
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "model_config": asdict(model.cfg),
        "vocab": vocab.to_dict(),
        "feature_dim": model.feature_dim,
        "encoder": encoder_spec.to_dict() if isinstance(encoder_spec, EncoderSpec) else dict(encoder_spec),
        "model": state,
    }


def read(path: str | Path, training: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict safely, with one-line errors for every way a file can be wrong.

    Older formats are migrated in memory. `training=True` also requires what resuming needs (optimizer,
    step, config...), which shipped models leave out.
    """
    path = Path(path)
    if not path.exists():
        raise CaptionerError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CaptionerError(f"{path}: is a directory, not a checkpoint")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise CaptionerError(f"{path}: empty file (0 bytes), not a checkpoint")
    # torch.save writes a zip archive; its legacy format (and plain pickle) starts with the PROTO opcode.
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CaptionerError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says enough
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CaptionerError(f"{path}: refused to load: {_refusal(err)}") from None
    except Exception as err:  # noqa: BLE001 - whatever fails to parse in an untrusted file is the file's fault
        first = _one_line(err).split(". ")[0]  # torch appends paragraphs of advice after the first sentence
        raise CaptionerError(f"{path}: not a readable checkpoint (truncated or corrupt: {first})") from None
    ckpt = _migrate(ckpt, path)
    _check_fields(ckpt, path, MODEL_KEYS + (TRAINING_KEYS if training else ()))
    return ckpt


def _refusal(err: pickle.UnpicklingError) -> str:
    """The useful part of torch's weights-only refusal. Its first lines suggest loading with
    weights_only=False, which is exactly what one must not do with a file from a stranger."""
    text = str(err)
    name = re.search(r"GLOBAL ([\w.]+)", text)
    if name:
        return (f"it would call {name.group(1)} while loading; only tensors and plain containers are "
                f"accepted, so no code in a checkpoint ever runs")
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        return f"not a plain-tensor checkpoint (pickle opcode {opcode.group(1)} is not accepted)"
    return "not a plain-tensor checkpoint (weights-only loading does not accept its content)"


def _migrate(ckpt: Any, path: Path) -> dict[str, Any]:
    """Bring a loaded dict of any known format version up to FORMAT_VERSION, one step at a time."""
    if not isinstance(ckpt, dict):
        raise CaptionerError(f"{path}: not a captioner checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    if FORMAT not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CaptionerError(f"{path}: a bare state_dict of {len(ckpt)} tensors, not a captioner checkpoint "
                             "(it has no model config or vocabulary)")
    version = ckpt.get(FORMAT, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CaptionerError(f"{path}: not a captioner checkpoint (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise CaptionerError(f"{path}: checkpoint format {version} is newer than this captioner "
                             f"understands ({FORMAT_VERSION}); upgrade captioner")
    for old in range(version, FORMAT_VERSION):
        ckpt = _MIGRATIONS[old](ckpt, path)
        log.debug("%s: migrated checkpoint format %d to %d", path, old, old + 1)
    return ckpt


def _v0_to_v1(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    words = ckpt.get("vocab")
    if isinstance(words, (list, tuple)):
        try:
            vocab = Vocabulary(words).to_dict()
        except CaptionerError as err:
            raise CaptionerError(f"{path}: {err}") from None
        except TypeError:
            raise CaptionerError(f"{path}: vocabulary is not a list of words") from None
        ckpt = {**ckpt, "vocab": vocab}
    return {**ckpt, FORMAT: 1}


# _MIGRATIONS[v] turns format v into v + 1.
_MIGRATIONS: dict[int, Callable[[dict[str, Any], Path], dict[str, Any]]] = {0: _v0_to_v1}


def _check_fields(ckpt: dict[str, Any], path: Path, required: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in ckpt]
    if missing and set(missing) <= set(TRAINING_KEYS):
        raise CaptionerError(f"{path}: a model without training state (no {', '.join(missing)}): "
                             "it can caption but not resume training")
    if missing:
        raise CaptionerError(f"{path}: not a captioner checkpoint: it lacks {', '.join(missing)}")
    kinds = {"model_config": dict, "vocab": dict, "encoder": dict, "model": dict, "feature_dim": int}
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if not wrong and not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        wrong = ["model"]
    if wrong:
        raise CaptionerError(f"{path}: damaged checkpoint: {', '.join(wrong)} has the wrong type")


def build_model(ckpt: dict[str, Any], path: str | Path = "checkpoint",
                expected: ModelConfig | None = None) -> LoadedModel:
    """Rebuild the decoder from a checkpoint dict and load its weights (as float32).

    With `expected`, a checkpoint of another architecture is refused with what differs, before loading.
    """
    try:
        cfg: ModelConfig = model_config_from_dict(ckpt["model_config"])
        validate(Config(model=cfg))
        vocab = Vocabulary.from_dict(ckpt["vocab"])
    except CaptionerError as err:
        raise CaptionerError(f"{path}: {err}") from None
    if expected is not None and cfg != expected:
        raise CaptionerError(f"{path}: a checkpoint of another architecture (checkpoint vs expected): "
                             f"{'; '.join(config_differences(cfg, expected))}")
    if ckpt["feature_dim"] <= 0:
        raise CaptionerError(f"{path}: damaged checkpoint: feature_dim {ckpt['feature_dim']}")
    _check_size(cfg, len(vocab), ckpt["feature_dim"], path)
    with without_random_init():  # every weight is loaded below: no need to draw them first
        model = CaptionDecoder(cfg, vocab_size=len(vocab), feature_dim=ckpt["feature_dim"], pad_id=vocab.pad_id)
    # Fresh float32 tensors (never the checkpoint dict's own) that become the parameters as they are
    # (assign): the empty ones built above are never written, and the weights are copied once, not twice.
    state = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
             for k, v in ckpt["model"].items()}
    load_state(model, state, path, assign=True)
    return LoadedModel(model.eval(), vocab, ckpt["encoder"], ckpt, ckpt.get(ENCODER_STATE))


def decoder_parameters(cfg: ModelConfig, vocab_size: int, feature_dim: int) -> int:
    """How many parameters CaptionDecoder(cfg, vocab_size, feature_dim) holds, counted from the config
    alone (nothing is allocated); a test checks it against the built model for every kind of config."""
    E, H, L, V, F = cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, vocab_size, feature_dim
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cfg.cell]
    in_dims = [E] + [H] * (L - 1)
    n = V * E  # the embedding
    n += sum(gates * H * (d + H + 2) for d in in_dims)  # W_ih, W_hh and both biases of each layer
    if cfg.conditioning in ("inject", "both"):
        n += sum(F * d + d for d in in_dims)
    if cfg.conditioning in ("init", "both"):
        width = L * (2 if cfg.cell == "lstm" else 1) * H
        n += F * width + width
    if cfg.highway and L > 1:
        n += (L - 1) * (H * H + H) * (1 if cfg.highway_coupled else 2)
    n += V + (0 if cfg.tie_weights else H * V)  # W_hy (shared with the embedding when tied) and its bias
    return n


def _check_size(cfg: ModelConfig, vocab_size: int, feature_dim: int, path: str | Path) -> None:
    """Refuse, before allocating anything, a checkpoint whose config describes an absurdly large decoder."""
    size = 4 * decoder_parameters(cfg, vocab_size, feature_dim)
    bound, why = MAX_DECODER_BYTES, f"the limit is {MAX_DECODER_BYTES / 1024**3:.0f} GiB"
    memory = _memory_bytes()
    if memory and memory // 2 < bound:
        bound, why = memory // 2, f"half of this machine's {memory / 1024**3:.1f} GiB of memory"
    if size > bound:
        raise CaptionerError(
            f"{path}: its config describes a decoder of {size / 4:.3g} parameters ({size / 1e9:.1f} GB; "
            f"model.hidden_dim {cfg.hidden_dim}, model.embed_dim {cfg.embed_dim}, {cfg.num_layers} layer(s), "
            f"{vocab_size} words), more than any captioning decoder needs ({why}): a damaged or hostile "
            "checkpoint; not built")


def _memory_bytes() -> int:
    """The machine's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """["model.cell: lstm vs gru", ...] for every field where `a` and `b` differ."""
    return [f"model.{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}"
            for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)]


def architecture_of(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a decoder's tensor shapes say about its architecture, keyed as the config names it.

    Applied to both a model's own state_dict and a checkpoint's weights, it turns a shape mismatch into
    "model.hidden_dim: 32 vs 64" instead of a list of tensor names.
    """
    found: dict[str, Any] = {}
    embed = state.get("embed.weight")
    if embed is not None and embed.dim() == 2:
        found["vocabulary size"], found["model.embed_dim"] = embed.shape
    hh = state.get("layers.0.weight_hh_l0")
    if hh is not None and hh.dim() == 2 and hh.shape[1] > 0:
        rows, hidden = hh.shape  # (gates * H, H): gates is 1 (tanh RNN), 3 (GRU) or 4 (LSTM)
        found["model.hidden_dim"] = hidden
        found["model.cell"] = {1: "rnn", 3: "gru", 4: "lstm"}.get(rows / hidden, f"? ({rows} gate rows)")
    found["model.num_layers"] = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    inject = any(k.startswith("image_in.") for k in state)
    init = any(k.startswith("image_init.") for k in state)
    found["model.conditioning"] = {(True, False): "inject", (False, True): "init", (True, True): "both"}.get(
        (inject, init), "none")
    image = state.get("image_in.0.weight", state.get("image_init.weight"))
    if image is not None and image.dim() == 2:
        found["feature_dim"] = image.shape[1]
    found["model.highway"] = any(k.startswith("highway.") for k in state)
    return found


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
               assign: bool = False) -> None:
    """load_state_dict with a message that says what differs instead of a wall of key names. `assign`: the
    tensors of `state` become the model's parameters (load_state_dict(assign=True)) instead of being copied
    into them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        model.load_state_dict(state, assign=assign)
        return
    described, stored = architecture_of(own), architecture_of(state)
    differs = [f"{k}: {v} vs {stored.get(k, 'absent')}" for k, v in described.items() if stored.get(k) != v]
    if differs:
        raise CaptionerError(f"{path}: its weights are for another model than it describes (described vs "
                             f"weights): {'; '.join(differs)}")
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} weights (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {sorted(shapes)[0]})")
    raise CaptionerError(f"{path}: weights do not fit the model it describes: {'; '.join(parts)}")


def load_model(path: str | Path, expected: ModelConfig | None = None) -> LoadedModel:
    return build_model(read(path), path, expected)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def ensemble_of(loaded: Sequence[LoadedModel], paths: Sequence[str | Path]) -> LoadedModel:
    """Loaded checkpoints -> one LoadedModel whose model is their Ensemble.

    Refused with a one-line CaptionerError naming two of the checkpoints when they do not share the
    vocabulary, the encoder spec (image features), or fine-tuned encoder weights.
    """
    first, first_path = loaded[0], paths[0]
    for other, path in zip(loaded[1:], paths[1:]):
        refuse = f"cannot ensemble {first_path} with {path}"
        if other.vocab != first.vocab:
            raise CaptionerError(f"{refuse}: their vocabularies differ "
                                 f"({_vocab_difference(first.vocab, other.vocab)})")
        tuned = [p for p, m in ((first_path, first), (path, other)) if m.encoder_state is not None]
        if len(tuned) == 1:
            untuned = path if tuned[0] == first_path else first_path
            raise CaptionerError(f"{refuse}: {tuned[0]} carries fine-tuned encoder weights and {untuned} "
                                 "does not, so they read different image vectors")
        differs = feature_differences(first.encoder, other.encoder,
                                      feature_dims=(first.model.feature_dim, other.model.feature_dim))
        if differs:
            raise CaptionerError(f"{refuse}: they were trained on different image features "
                                 f"({'; '.join(differs)})")
    return LoadedModel(Ensemble([m.model for m in loaded]), first.vocab, first.encoder, first.checkpoint,
                       first.encoder_state, tuple(loaded))


def _vocab_difference(a: Vocabulary, b: Vocabulary) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} words"
    i = next(i for i, (x, y) in enumerate(zip(a.words, b.words)) if x != y)
    return f"word {i} is {a.words[i]!r} vs {b.words[i]!r}"


def export(src: str | Path, dst: str | Path) -> Path:
    """A training checkpoint as a small shippable one: float16 weights, no optimizer state, and where it
    came from (the resolved training config, the epoch, the dev metrics it was selected on)."""
    ckpt = read(src)
    loaded = build_model(ckpt, src)
    payload = model_payload(loaded.model, loaded.vocab, loaded.encoder, half=True)
    payload[PROVENANCE] = {
        "source": Path(src).name,
        "config": ckpt.get("config"),
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
        "dev_metrics": ckpt.get("metrics"),
    }
    if ckpt.get(HOLDOUT) is not None:  # the training images it was selected on, as recorded
        payload[HOLDOUT] = ckpt[HOLDOUT]
    save(dst, payload)
    carry_index(src, dst)
    return Path(dst)


def carry_index(src: str | Path, dst: str | Path) -> Path | None:
    """Copy the neighbour index that goes with `src` (captioner.model.neighbours) beside `dst` as DST.knn."""
    found = index_path(src)
    if found is None:
        return None
    out = Path(dst).with_suffix(INDEX_SUFFIX)
    if found.resolve() != out.resolve():
        data = found.read_bytes()
        atomic_write(out, lambda f: f.write(data))
    return out


# Which files a checkpoint argument names (a shipped model's name, a file, an ensemble run's folder) is
# captioner.pretrained's business, the one place that knows the shipped models; these thin aliases stay for
# the callers (Captioner, the tests, the benchmarks) that have always asked here, and add nothing to it. SINGLE_MODEL, the first member (exactly `--config flickr8k`), is the
# fastest alone and what `analyze` looks inside; DEFAULT_MODELS, the members of the default ensemble.
SINGLE_MODEL = pretrained.SINGLE
DEFAULT_MODELS = pretrained.default_members()


def pretrained_path(name_or_path: str | Path | None) -> Path:
    """None or a single shipped model's name ("flickr8k") -> that file; otherwise a checkpoint file's path."""
    return pretrained.resolve_one(name_or_path)


def pretrained_paths(names_or_paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files, shipped models' names or ensemble run folders -> their files; none -> the default's."""
    return pretrained.resolve(names_or_paths)


member_checkpoints = pretrained.member_checkpoints


def export_all(src: str | Path, dst: str | Path) -> list[Path]:
    """`export` for a checkpoint file, or for each member of an ensemble run directory: member 1 goes to
    `dst`, member i to `dst` with -i before the suffix (flickr8k.pt, flickr8k-2.pt, ...)."""
    members = member_checkpoints(src)
    if not members:
        return [export(src, dst)]
    dst = Path(dst)
    return [export(m, dst if i == 1 else dst.with_name(f"{dst.stem}-{i}{dst.suffix}"))
            for i, m in enumerate(members, start=1)]


def default_checkpoint() -> Path:
    """The single shipped model (a GRU decoder trained on Flickr8k train, selected on dev)."""
    return pretrained.resolve_one(None)


def default_checkpoints() -> list[Path]:
    """The shipped models that, ensembled, are the default captioner."""
    return pretrained.resolve([])
