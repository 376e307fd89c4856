"""Pretrained CNN backbones by name: image -> feature vector v (and the conv grid behind it).

    encoder = build_encoder("efficientnet_lite0")
    x = torch.stack([encoder.preprocess(load_image(p)) for p in paths])   # (B, 3, 224, 224)
    v = encoder(x)                                                         # (B, 1280)

Every encoder carries an `EncoderSpec`: everything that determines its features (weights, preprocessing,
flip averaging). It goes into checkpoints and into the feature-cache key, so features from different
backbones or different preprocessing never mix. Encoders are built frozen (eval mode, no gradients);
`unfreeze_last(n)` opens the last n blocks for fine-tuning.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, fields, replace
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn

from captioner.choices import ENCODERS, POOLINGS
from captioner.errors import CaptionerError
from captioner.vision.encoders.preprocess import SpecTransform
from captioner.vision.tags import tag_words, word_probabilities


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that determines the features an encoder produces."""

    name: str                 # registry name, e.g. "efficientnet_lite0"
    weights: str              # which pretrained weights (file name or torchvision enum)
    image_size: int           # side of the square crop fed to the network
    resize: int               # shorter side is resized to this before the center crop
    mean: tuple[float, ...]   # per-channel normalisation applied to [0, 1] pixels
    std: tuple[float, ...]
    feature_dim: int          # length of the pooled vector v
    interpolation: str        # resize filter ("bicubic", "bilinear")
    # Fields added later have defaults, so specs stored before them (checkpoints, cache indexes) still
    # describe the same features: see spec_key and spec_with_defaults.
    flip_average: bool = False  # v = mean of f(image) and f(image mirrored left-right)
    pooling: str = "mean"       # how the last grid becomes v: mean | max | meanmax (both, concatenated)
    tags: bool = False          # v ends with the tag words' probabilities (captioner.vision.tags)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> EncoderSpec:
        """The spec as stored (a checkpoint), fields it predates at their defaults; unknown keys refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(stored) - known)
        if unknown:
            raise CaptionerError(f"encoder spec has fields this captioner does not know: {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in stored)
        if missing:
            raise CaptionerError(f"encoder spec lacks {', '.join(missing)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in spec_with_defaults(stored).items()}
        return cls(**values)

    def differences(self, other: EncoderSpec) -> list[str]:
        """The names of the fields where `other` differs (feature_differences says how)."""
        return [difference.split(":")[0] for difference in feature_differences(self, other)]


def spec_key(spec: EncoderSpec) -> dict[str, Any]:
    """The spec as the dict that keys the feature cache. Fields with a default are left out while at their
    default, so plain features keep the cache folder they had before those fields existed, and any other
    value (flip_average = True) gets a folder of its own."""
    return {f.name: getattr(spec, f.name) for f in fields(spec)
            if f.default is MISSING or getattr(spec, f.name) != f.default}


def spec_with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A spec dict as stored (in a checkpoint), with the fields it predates filled in at their defaults."""
    return {**{f.name: f.default for f in fields(EncoderSpec) if f.default is not MISSING}, **stored}


def feature_differences(trained: EncoderSpec | Mapping[str, Any], other: EncoderSpec | Mapping[str, Any],
                        keys: Sequence[str] | None = None,
                        feature_dims: tuple[int, int] | None = None) -> list[str]:
    """The one check of "is this the encoder the model was trained on": where the image features `other`
    describes differ from those `trained` describes, as ["pooling: mean vs max", ...] ([]: the same).

    Either is an EncoderSpec or a spec as stored (a checkpoint's, an index's, a config's encoder keys); a
    field a stored spec predates counts at its default, one it lacks without a default is "absent". `keys`
    compares only those fields; `feature_dims`, the lengths of v the two sides read, is compared last.
    """
    a, b = (spec_with_defaults(s.to_dict() if isinstance(s, EncoderSpec) else dict(s)) for s in (trained, other))
    names = keys if keys is not None else dict.fromkeys([*a, *b])
    found = [f"{k}: {a.get(k, 'absent')} vs {b.get(k, 'absent')}" for k in names if a.get(k) != b.get(k)]
    if feature_dims is not None and feature_dims[0] != feature_dims[1]:
        found.append(f"feature_dim: {feature_dims[0]} vs {feature_dims[1]}")
    return found


_Builder = Callable[[], "Encoder"]
_REGISTRY: dict[str, _Builder] = {}


def register(name: str) -> Callable[[_Builder], _Builder]:
    """Decorator: make `build_encoder(name)` call the decorated zero-argument builder. The name must be one
    of captioner.choices.ENCODERS, the list the command line and the config read."""
    def add(builder: _Builder) -> _Builder:
        if name not in ENCODERS:
            raise ValueError(f"encoder {name!r} is not listed in captioner.choices.ENCODERS")
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder
    return add


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def build_encoder(name: str = "efficientnet_lite0", flip_average: bool = False,
                  pooling: str = "mean", tags: bool = False) -> "Encoder":
    """The named pretrained encoder, frozen and in eval mode. CaptionerError for unknown names/missing weights.

    flip_average: v is the mean of the features of the image and of its mirror image (see Encoder.forward).
    pooling: mean (the default), max, or meanmax (the two concatenated: v twice as long).
    tags: v ends with the probabilities of the tag words that the encoder's ImageNet classifier gives the
    image (captioner.vision.tags), so a decoder sees what the classifier sees.
    """
    check_pooling(pooling)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CaptionerError(f"unknown encoder {name!r}{hint}; known: {', '.join(list_encoders())}")
    return set_features(_REGISTRY[name](), flip_average=flip_average, pooling=pooling, tags=tags)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise CaptionerError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


def set_features(encoder: Encoder, flip_average: bool = False, pooling: str = "mean",
                 tags: bool = False) -> Encoder:
    """`encoder` (as its builder made it: mean pooling, no flip, no tags) set to give the v these ask for
    (see build_encoder), its spec saying so; -> the same encoder."""
    check_pooling(pooling)
    if flip_average:
        encoder.spec = replace(encoder.spec, flip_average=True)
    if pooling != "mean":
        grid_dim = encoder.spec.feature_dim
        encoder.spec = replace(encoder.spec, pooling=pooling,
                               feature_dim=2 * grid_dim if pooling == "meanmax" else grid_dim)
    if tags:
        if encoder.classifier is None or pooling == "max":
            why = "has no ImageNet classifier" if encoder.classifier is None else "keeps no mean-pooled v (pooling max)"
            raise CaptionerError(f"encoder {encoder.spec.name} {why}, so it cannot give tags")
        encoder.spec = replace(encoder.spec, tags=True, feature_dim=encoder.spec.feature_dim + len(tag_words()))
    return encoder


class Encoder(nn.Module):
    """Base class: subclasses set `spec`, `transform`, `classifier` and implement forward_grid and stages."""

    spec: EncoderSpec
    transform: Callable[[Image.Image], torch.Tensor]  # picklable, so DataLoader workers can run it
    classifier: nn.Module | None                      # ImageNet head (B, feature_dim) -> (B, 1000)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, image_size, image_size) float tensor, normalised as the weights expect."""
        return self.transform(image)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) last conv feature map (7x7 for 224 inputs)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feature_dim) v: the grid pooled over its h*w positions (spec.pooling: the
        mean by default; max; or mean and max concatenated).

        With spec.flip_average, v = (f(x) + f(x mirrored left-right)) / 2: mirroring seldom changes what a
        caption should say, so the two views are two looks at the same content (test-time augmentation,
        applied in training too so that v means the same thing). Both views run as one batch of 2B.
        """
        v = self._pooled(x, self.spec.pooling)
        if not self.spec.tags:
            return v
        return torch.cat([v, word_probabilities(self, v).to(v.dtype)], dim=-1)

    def _pooled(self, x: torch.Tensor, pooling: str) -> torch.Tensor:
        if not self.spec.flip_average:
            return _pool(self.forward_grid(x), pooling)
        B = x.shape[0]
        both = _pool(self.forward_grid(torch.cat([x, x.flip(-1)])), pooling)  # (2B, feature_dim)
        return both.unflatten(0, (2, B)).mean(dim=0)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1000) ImageNet logits, for sanity checks of weights and preprocessing.
        The classifier was trained on the mean-pooled grid, so it gets that whatever spec.pooling says."""
        if self.classifier is None:
            raise CaptionerError(f"encoder {self.spec.name} has no ImageNet classifier")
        return self.classifier(self._pooled(x, "mean"))

    def stages(self) -> list[nn.Module]:
        """The feature blocks from input to output; `unfreeze_last(n)` opens the last n."""
        raise NotImplementedError

    # --- freezing -------------------------------------------------------------------------------------
    def freeze(self) -> "Encoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def unfreeze_last(self, n: int) -> "Encoder":
        """Freeze everything, then let gradients reach the last `n` stages (the classifier stays frozen)."""
        self.freeze()
        blocks = self.stages()
        if not 0 <= n <= len(blocks):
            raise CaptionerError(f"encoder {self.spec.name}: can unfreeze 0..{len(blocks)} blocks, not {n}")
        for block in blocks[len(blocks) - n:]:
            for p in block.parameters():
                p.requires_grad_(True)
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen blocks stay in eval mode even while the caption model trains: their BatchNorm statistics
        # are the pretrained ones, and updating them from small caption batches would shift v under the
        # decoder's feet. Only unfrozen blocks follow `mode`.
        super().train(mode)
        for module in [*self.stages(), self.classifier]:
            if module is not None and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self


def _pool(grid: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C) for mean or max, (B, 2C) [mean, max] for meanmax."""
    if pooling == "mean":
        return grid.mean(dim=(2, 3))
    if pooling == "max":
        return grid.amax(dim=(2, 3))
    return torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1)


def pil_transform(spec: EncoderSpec) -> SpecTransform:
    """Resize the shorter side to spec.resize, center-crop spec.image_size, to [0, 1], normalise: torchvision's
    Resize/CenterCrop/ToTensor/Normalize on PIL images, without importing torchvision (see preprocess.py)."""
    return SpecTransform(spec)
