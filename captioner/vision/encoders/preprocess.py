"""An encoder's preprocessing: RGB PIL image -> (3, crop, crop) normalised float tensor.

    transform = SpecTransform(spec)
    x = transform(image)        # resize the shorter side to spec.resize, center-crop spec.image_size,
                                # scale to [0, 1], (x - mean) / std

The same arithmetic as torchvision's `Compose([Resize(resize), CenterCrop(size), ToTensor(), Normalize(mean,
std)])` on PIL images (tests/test_encoders.py checks that the two agree bit for bit), written with PIL and
torch alone: importing torchvision imports its detection ops and through them torch's compiler stack,
which on a 2-core CPU took longer than importing torch itself, and captioning one photo needs none of it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

# torchvision's InterpolationMode values -> PIL's resampling filters.
_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
            "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `shorter` and the aspect ratio kept (the longer side
    truncated, as torchvision's Resize(int) does)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central size x size square (an image smaller than that is first padded with black, with the odd
    pixel on the right/bottom); the offset rounds half to even, as torchvision's CenterCrop."""
    width, height = image.size
    if size > width or size > height:
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        image = ImageOps.expand(image, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2),
                                fill=0)
        width, height = image.size
        if (width, height) == (size, size):
            return image
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_normalised_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    """8-bit PIL image -> (C, H, W) float32 in [0, 1], then (x - mean) / std per channel."""
    array = np.array(image, np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    return x.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])


class SpecTransform:
    """What an EncoderSpec says to do to an image before the network (picklable, for DataLoader workers)."""

    def __init__(self, spec):
        if spec.interpolation not in _FILTERS:
            raise ValueError(f"unknown interpolation {spec.interpolation!r}; known: {', '.join(_FILTERS)}")
        self.resize, self.size = spec.resize, spec.image_size
        self.interpolation = spec.interpolation
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = resized_size(*image.size, self.resize)
        if size != image.size:
            image = image.resize(size, _FILTERS[self.interpolation])
        return to_normalised_tensor(center_crop(image, self.size), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"SpecTransform(resize={self.resize}, crop={self.size}, {self.interpolation}, "
                f"mean={self.mean}, std={self.std})")
