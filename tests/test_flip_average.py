"""Flip-averaged image vectors: v = mean(f(image), f(mirrored image)), its own feature cache, and a model
trained on them gets them again at caption time; specs stored before the option existed still load."""

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner import checkpoint
from captioner.train import loop as training
from captioner.config import ModelConfig, load_config
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder
from captioner.vision.encoders import LITE0_SPEC, build_encoder, spec_key
from captioner.errors import CaptionerError
from captioner.vision.features import cache_folder, extract_features
from captioner.vision.images import load_image
from captioner.inference import Captioner
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
# A checkpoint stored before the options existed (flip_average, then pooling, then tags).
OLD_SPEC = {k: v for k, v in asdict(LITE0_SPEC).items() if k not in ("flip_average", "pooling", "tags")}


@pytest.fixture(scope="module")
def encoders():
    return build_encoder("efficientnet_lite0"), build_encoder("efficientnet_lite0", flip_average=True)


@pytest.fixture
def photo(tmp_path) -> Path:
    """Left half red, right half blue: its mirror image is a different picture."""
    image = Image.new("RGB", (80, 60), (220, 20, 20))
    image.paste((20, 40, 220), (40, 0, 80, 60))
    path = tmp_path / "halves.png"
    image.save(path)
    return path


def test_flip_averaged_v_is_the_mean_of_the_two_forwards(encoders, photo):
    plain, flipped = encoders
    assert flipped.spec == replace(plain.spec, flip_average=True) and not plain.spec.flip_average
    x = torch.stack([plain.preprocess(load_image(photo)), torch.randn(3, 224, 224)])
    torch.testing.assert_close(flipped.preprocess(load_image(photo)), x[0])  # preprocessing unchanged
    by_hand = (plain(x) + plain(x.flip(-1))) / 2
    torch.testing.assert_close(flipped(x), by_hand, rtol=0, atol=1e-5)
    assert (flipped(x) - plain(x)).abs().max() > 1e-2  # the mirror image does change v


def test_flip_averaged_features_have_their_own_cache(encoders, photo, tmp_path):
    plain, flipped = encoders
    # Plain features keep the folder they had before the option existed: caches already built stay valid.
    assert cache_folder(tmp_path, plain.spec).name == "efficientnet_lite0-9a452d4f6ecd0907"
    assert spec_key(plain.spec) == OLD_SPEC
    assert cache_folder(tmp_path, flipped.spec) != cache_folder(tmp_path, plain.spec)
    a = extract_features(plain, [photo], tmp_path, num_workers=0, progress=False)
    b = extract_features(flipped, [photo], tmp_path, num_workers=0, progress=False)
    assert a.folder != b.folder
    x = plain.preprocess(load_image(photo))[None]
    torch.testing.assert_close(b.get([photo]), flipped(x), rtol=0, atol=2e-3)  # float16 cache
    torch.testing.assert_close(a.get([photo]), plain(x), rtol=0, atol=2e-3)


def save_checkpoint(path: Path, spec: dict) -> Path:
    torch.manual_seed(0)
    words = ("<pad>", "<start>", "<end>", "<unk>", "a", "red", "square")
    cfg = ModelConfig(embed_dim=8, hidden_dim=8, dropout=0.0)
    model = CaptionDecoder(cfg, len(words), LITE0_SPEC.feature_dim)
    checkpoint.save(path, checkpoint.model_payload(model, Vocabulary(words), spec))
    return path


def test_a_spec_stored_without_the_field_loads_as_plain_features(tmp_path, encoders, photo):
    old = save_checkpoint(tmp_path / "old.pt", OLD_SPEC)
    captioner = Captioner.from_checkpoint(old)
    assert not captioner.encoder.spec.flip_average
    flip = save_checkpoint(tmp_path / "flip.pt", asdict(replace(LITE0_SPEC, flip_average=True)))
    x = encoders[0].preprocess(load_image(photo))[None]
    torch.testing.assert_close(Captioner.from_checkpoint(flip).encoder(x), encoders[1](x))
    # An old checkpoint ensembles with a new plain one, not with a flip-averaged one.
    new = save_checkpoint(tmp_path / "new.pt", asdict(LITE0_SPEC))
    Captioner.from_checkpoints([old, new])
    with pytest.raises(CaptionerError, match="flip_average: False vs True"):
        Captioner.from_checkpoints([old, flip])


def test_training_with_flip_average_captions_with_it(tmp_path, encoders, photo):
    data = make_flickr_layout(tmp_path / "flickr")
    cache = tmp_path / "cache"
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={cache}",
                                                       "train.epochs=1", "encoder.flip_average=true",
                                                       "train.precision=fp32"])  # the fp32 cache key
    training.fit(cfg, tmp_path / "run")
    assert [p.name for p in cache.iterdir()] == [cache_folder(cache, encoders[1].spec).name]
    ckpt = tmp_path / "run" / "last.pt"
    assert checkpoint.read(ckpt)["encoder"]["flip_average"] is True
    captioner = Captioner.from_checkpoint(ckpt)  # what caption.py and evaluate.py use
    x = encoders[0].preprocess(load_image(photo))[None]
    torch.testing.assert_close(captioner.encoder(x), encoders[1](x))
    assert list(captioner.caption_images([photo]))[0][1].caption
