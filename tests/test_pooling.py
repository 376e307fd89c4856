"""Pooling of the last grid into v: mean (the default, cache key unchanged), max, or both concatenated."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.vision.encoders import LITE0_SPEC, build_encoder, set_features, spec_key, spec_with_defaults
from captioner.vision.encoders.lite import EfficientNetLite0
from captioner.vision.features import cache_folder

# The spec fields as they were before pooling and flip_average existed: their folder must not move.
BEFORE = ("name", "weights", "image_size", "resize", "mean", "std", "feature_dim", "interpolation")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = EfficientNetLite0(pretrained=False)
    for m in model.modules():  # random BatchNorm statistics, so the grid is not flat
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_mean_pooling_keeps_the_cache_folder_it_always_had():
    old = {k: v for k, v in asdict(LITE0_SPEC).items() if k in BEFORE}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert spec_key(LITE0_SPEC) == old
    assert cache_folder(Path("c"), LITE0_SPEC) == Path("c") / f"efficientnet_lite0-{digest}"
    assert spec_with_defaults(old)["pooling"] == "mean"  # a checkpoint stored before the option


def test_max_and_meanmax_pool_the_grid_and_get_their_own_folders(net):
    x = torch.randn(2, 3, 96, 96)
    grid = net.forward_grid(x)
    folders = set()
    expected = {"mean": grid.mean(dim=(2, 3)), "max": grid.amax(dim=(2, 3)),
                "meanmax": torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], 1)}
    logits = None
    for pooling, want in expected.items():
        encoder = set_features(net, pooling=pooling)  # what build_encoder does to the network it builds
        v = encoder(x)
        torch.testing.assert_close(v, want)
        assert encoder.spec.feature_dim == want.shape[1] == (2560 if pooling == "meanmax" else 1280)
        folders.add(cache_folder(Path("c"), encoder.spec))
        # The ImageNet head was trained on the mean: classify ignores the pooling.
        out = encoder.classify(x)
        logits = out if logits is None else logits
        torch.testing.assert_close(out, logits)
    assert len(folders) == 3
    assert not torch.allclose(expected["mean"], expected["max"])


def test_unknown_pooling_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionerError, match="unknown pooling 'avg'"):
        build_encoder("efficientnet_lite0", pooling="avg")
    with pytest.raises(CaptionerError, match="encoder.pooling must be one of mean, max, meanmax"):
        load_config(None, ["encoder.pooling=sum"])
    assert load_config(None, ["encoder.pooling=meanmax"]).encoder.pooling == "meanmax"
