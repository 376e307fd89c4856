"""Feature cache: extract once, serve from the memmap, recompute only what changed, survive damage."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from captioner.vision.encoders import Encoder, EncoderSpec
from captioner.errors import CaptionerError
from captioner.vision.features import ARRAY_FILE, INDEX_FILE, extract_features

SPEC = EncoderSpec(name="tiny", weights="none", image_size=16, resize=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                   feature_dim=4, interpolation="bilinear")


class TinyEncoder(Encoder):
    """Mean colour per channel plus brightness: deterministic, fast, and counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.spec, self.classifier = SPEC, None
        self.transform = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.images_seen = 0

    def forward_grid(self, x):  # (B, 3, 16, 16) -> (B, 4, 16, 16)
        self.images_seen += x.shape[0]
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1) * self.scale

    def stages(self):
        return []


def make_images(folder, n=8):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (20 + i, 12), (30 * i, 255 - 30 * i, 100)).save(path)
        paths.append(path)
    return paths


def expected(path):
    x = transforms.ToTensor()(Image.open(path).convert("RGB").resize((16, 16)))
    return torch.cat([x.mean((1, 2)), x.mean().reshape(1)])


@pytest.fixture
def setup(tmp_path):
    return TinyEncoder(), make_images(tmp_path / "imgs"), tmp_path / "cache"


def test_extract_then_cache_hit_does_no_forward(setup):
    encoder, paths, cache = setup
    store = extract_features(encoder, paths, cache, batch_size=3, num_workers=0, progress=False)
    assert encoder.images_seen == 8 and len(store) == 8 and store.dim == 4
    assert store.array.dtype == np.float16 and isinstance(store.array, np.memmap)
    order = [paths[5], paths[0], paths[5]]
    torch.testing.assert_close(store.get(order), torch.stack([expected(p) for p in order]), atol=2e-3, rtol=0)
    assert store.get(order).dtype == torch.float32
    rows = store.rows(order)
    assert rows[0] == rows[2] != rows[1]

    again = extract_features(encoder, paths, cache, batch_size=3, num_workers=0, progress=False)
    assert encoder.images_seen == 8  # nothing recomputed
    torch.testing.assert_close(again.get(paths), store.get(paths))


def test_workers_and_a_different_spec_get_their_own_folder(setup):
    encoder, paths, cache = setup
    store = extract_features(encoder, paths, cache, batch_size=4, num_workers=2, progress=False)
    other = TinyEncoder()
    other.spec = EncoderSpec(**{**SPEC.__dict__, "resize": 20})
    other_store = extract_features(other, paths, cache, batch_size=4, num_workers=0, progress=False)
    assert other.images_seen == 8 and other_store.folder != store.folder


def test_changed_file_is_recomputed_alone_and_not_served_stale(setup):
    encoder, paths, cache = setup
    extract_features(encoder, paths, cache, num_workers=0, progress=False)
    Image.new("RGB", (20, 12), (255, 0, 0)).save(paths[2])
    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    store = extract_features(encoder, paths, cache, num_workers=0, progress=False)
    assert encoder.images_seen == 9
    torch.testing.assert_close(store.get([paths[2]])[0], expected(paths[2]), atol=2e-3, rtol=0)
    new = make_images(paths[0].parent.parent / "more", n=2)
    store = extract_features(encoder, paths + new, cache, num_workers=0, progress=False)
    assert encoder.images_seen == 11 and len(store) == 10


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "index"])
def test_damaged_cache_is_detected_and_rebuilt(setup, damage, caplog):
    encoder, paths, cache = setup
    store = extract_features(encoder, paths, cache, num_workers=0, progress=False)
    good = store.get(paths).clone()
    array_file, index_file = store.folder / ARRAY_FILE, store.folder / INDEX_FILE
    del store
    if damage == "truncate":
        array_file.write_bytes(array_file.read_bytes()[:-20])
    elif damage == "flip":
        data = bytearray(array_file.read_bytes())
        data[-3] ^= 0xFF
        array_file.write_bytes(bytes(data))
    elif damage == "delete":
        array_file.unlink()
    else:
        index_file.write_text(index_file.read_text()[:50])
    with caplog.at_level(logging.WARNING, logger="captioner"):
        store = extract_features(encoder, paths, cache, num_workers=0, progress=False)
    assert "damaged" in caplog.text and encoder.images_seen == 16
    torch.testing.assert_close(store.get(paths), good)


def test_bad_image_is_skipped_with_one_warning(setup, caplog):
    encoder, paths, cache = setup
    bad = paths[0].parent / "broken.jpg"
    bad.write_text("not a jpeg")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        store = extract_features(encoder, [*paths[:3], bad, *paths[3:]], cache, batch_size=2,
                                 num_workers=2, progress=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage()
    assert bad not in store and paths[3] in store and len(store) == 8 and bad in store.failures
    with pytest.raises(CaptionerError, match="broken.jpg"):
        store.get([bad])
    # Known bad and unchanged: not decoded again, but still reported.
    extract_features(encoder, [*paths, bad], cache, num_workers=0, progress=False)
    assert encoder.images_seen == 8


def test_empty_request(setup):
    encoder, _, cache = setup
    store = extract_features(encoder, [], cache, num_workers=0, progress=False)
    assert len(store) == 0 and store.get([]).shape == (0, 4)
