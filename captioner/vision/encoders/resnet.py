"""torchvision ResNets: weights through torchvision's API, but only from the local torch hub cache."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn

from captioner.errors import CaptionerError
from captioner.vision.encoders.registry import Encoder, EncoderSpec, register


class TorchvisionResNet(Encoder):
    """A torchvision ResNet without its pooling/fc as the grid; weights' own transforms as preprocessing."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT
        # Look for the file ourselves instead of letting torchvision try: with no internet a download
        # attempt hangs until a socket timeout, and the user gets a traceback instead of instructions.
        filename = os.path.basename(urlparse(weights.url).path)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file():
            raise CaptionerError(f"{name} weights not cached: download {weights.url} to {cached} "
                                 f"(or set TORCH_HOME to a folder whose checkpoints/ holds {filename})")
        net = torchvision.models.get_model(name, weights=None)
        net.load_state_dict(torch.load(cached, weights_only=True, map_location="cpu"), strict=True)

        preset = weights.transforms()  # ImageClassification: resize, crop, normalise; picklable
        self.transform = preset
        self.spec = EncoderSpec(
            name=name, weights=str(weights), image_size=preset.crop_size[0], resize=preset.resize_size[0],
            mean=tuple(preset.mean), std=tuple(preset.std), feature_dim=net.fc.in_features,
            interpolation=preset.interpolation.value,
        )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.classifier = net.fc
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPU, same values
        self.freeze()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(self.stem(x))  # (B, 2048, 7, 7) for 224 inputs

    def stages(self) -> list[nn.Module]:
        return [self.stem, *(block for layer in self.layers for block in layer)]  # bottleneck blocks


for _name in ("resnet50", "resnet101", "resnet152"):
    register(_name)(lambda name=_name: TorchvisionResNet(name))
