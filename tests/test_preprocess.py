"""An encoder's preprocessing without torchvision: the same tensors as torchvision's transforms, bit for bit
(tests/test_cold_start.py checks that captioning imports no torchvision)."""

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from captioner.vision.encoders import LITE0_SPEC
from captioner.vision.encoders.preprocess import SpecTransform
from captioner.vision.images import load_image

REPO = Path(__file__).resolve().parents[1]


def torchvision_transform(spec):
    return transforms.Compose([
        transforms.Resize(spec.resize, interpolation=transforms.InterpolationMode(spec.interpolation)),
        transforms.CenterCrop(spec.image_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def _noise(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (256, 256), (224, 224), (301, 257), (257, 999),
                                  (100, 60), (3, 500)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_same_tensor_as_torchvision(size, interpolation):
    spec = replace(LITE0_SPEC, interpolation=interpolation)
    image = _noise(*size, seed=sum(size))
    ours, theirs = SpecTransform(spec)(image), torchvision_transform(spec)(image)
    assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


def test_same_tensor_as_torchvision_on_the_example_photos_grayscale_and_a_small_crop():
    for photo in sorted((REPO / "examples").glob("*.jpg")):
        image = load_image(photo)
        assert torch.equal(SpecTransform(LITE0_SPEC)(image), torchvision_transform(LITE0_SPEC)(image))
    gray = replace(LITE0_SPEC, mean=(0.5,), std=(0.25,))
    assert torch.equal(SpecTransform(gray)(_noise(300, 200, "L")), torchvision_transform(gray)(_noise(300, 200, "L")))
    larger = replace(LITE0_SPEC, image_size=300)  # a crop larger than the resized image: padded with black
    assert torch.equal(SpecTransform(larger)(_noise(400, 256)), torchvision_transform(larger)(_noise(400, 256)))


def test_picklable_for_dataloader_workers():
    transform = pickle.loads(pickle.dumps(SpecTransform(LITE0_SPEC)))
    assert torch.equal(transform(_noise(300, 200)), SpecTransform(LITE0_SPEC)(_noise(300, 200)))
