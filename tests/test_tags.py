"""Tags: the encoder's ImageNet classifier as caption words, through the hand-made class -> word table."""

import re
from pathlib import Path

import pytest
import torch
from torchvision.models._meta import _IMAGENET_CATEGORIES

from captioner import checkpoint
from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.inference import Captioner
from captioner.train import loop as training
from captioner.vision.encoders import EncoderSpec, build_encoder, spec_key
from captioner.vision.tags import (N_CLASSES, class_probabilities, imagenet_table, tag_words, tags,
                                   word_probabilities)
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]


def word_of(name):
    return {n: w for n, w in imagenet_table()}[name]


def test_the_table_has_every_class_in_order_with_torchvisions_names():
    table = imagenet_table()
    assert len(table) == N_CLASSES == len(_IMAGENET_CATEGORIES)
    assert [name for name, _ in table] == list(_IMAGENET_CATEGORIES)


def test_words_are_single_lower_case_words():
    words = tag_words()
    assert 200 < len(words) < 600
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert sum(1 for _, w in imagenet_table() if w) > 700  # most classes name something a caption would


def test_the_words_a_person_would_use():
    table = imagenet_table()
    assert {w for _, w in table[151:269]} == {"dog"}  # every breed of dog
    for name, word in [("tabby", "cat"), ("Siamese cat", "cat"), ("mountain bike", "bicycle"),
                       ("broccoli", "broccoli"), ("seashore", "beach"), ("pizza", "pizza"),
                       ("ice bear", "bear"), ("laptop", "laptop"), ("refrigerator", "refrigerator"),
                       ("school bus", "bus"), ("washbasin", "sink"), ("airliner", "airplane")]:
        assert word_of(name) == word, name
    for name in ("abacus", "chiton", "nematode"):
        assert word_of(name) == ""


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet_lite0")


def test_word_probabilities_sum_their_classes(lite0):
    v = torch.randn(3, lite0.spec.feature_dim)
    classes = class_probabilities(lite0, v)
    words = word_probabilities(lite0, v)
    assert classes.shape == (3, N_CLASSES) and words.shape == (3, len(tag_words()))
    dog = tag_words().index("dog")
    dogs = [i for i, (_, w) in enumerate(imagenet_table()) if w == "dog"]  # the breeds, dingo, dhole, ...
    assert set(range(151, 269)) < set(dogs)
    assert torch.allclose(words[:, dog], classes[:, dogs].sum(-1))
    mapped = [i for i, (_, w) in enumerate(imagenet_table()) if w]
    assert torch.allclose(words.sum(-1), classes[:, mapped].sum(-1), atol=1e-5)


def test_tags_are_the_likely_words_most_first(lite0):
    # A v that the classifier reads as a pizza: its weight row is the direction the pizza logit grows in.
    v = lite0.classifier.weight[963].detach().clone().unsqueeze(0) * 5
    (found,) = tags(lite0, v, threshold=0.1)
    assert found and found[0].word == "pizza"
    assert all(a.probability >= b.probability for a, b in zip(found, found[1:]))
    assert all(t.probability >= 0.1 for t in found)


def test_meanmax_features_give_the_mean_half_to_the_classifier():
    enc = build_encoder("efficientnet_lite0", pooling="meanmax")
    mean = torch.randn(2, enc.spec.feature_dim // 2)
    v = torch.cat([mean, torch.randn_like(mean) * 100], dim=-1)
    plain = build_encoder("efficientnet_lite0")
    assert torch.allclose(class_probabilities(enc, v), class_probabilities(plain, mean), atol=1e-6)


def test_an_encoder_with_tags_appends_the_word_probabilities_to_v(lite0):
    tagged = build_encoder("efficientnet_lite0", tags=True)
    assert tagged.spec.tags and tagged.spec.feature_dim == lite0.spec.feature_dim + len(tag_words())
    x = torch.randn(2, 3, 96, 96)
    v, plain = tagged(x), lite0(x)
    torch.testing.assert_close(v[:, : plain.shape[1]], plain)
    torch.testing.assert_close(v[:, plain.shape[1]:], word_probabilities(lite0, plain))
    # tagged features are cached apart; a spec stored before the option reads as untagged
    assert spec_key(tagged.spec)["tags"] is True and "tags" not in spec_key(lite0.spec)
    old = {k: val for k, val in lite0.spec.to_dict().items() if k != "tags"}
    assert EncoderSpec.from_dict(old).tags is False


def test_tags_need_the_mean_pooled_v():
    with pytest.raises(CaptionerError, match="cannot give tags"):
        build_encoder("efficientnet_lite0", pooling="max", tags=True)
    with pytest.raises(CaptionerError, match="encoder.tags needs the mean-pooled v"):
        load_config(None, ["encoder.tags=true", "encoder.pooling=max"])


def test_a_model_trained_on_tagged_features_captions_with_them(tmp_path):
    data = make_flickr_layout(tmp_path / "flickr")
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={tmp_path / 'cache'}",
                                                       "train.epochs=1", "encoder.tags=true",
                                                       "train.precision=fp32"])
    training.fit(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "last.pt"
    stored = checkpoint.read(ckpt)
    assert stored["encoder"]["tags"] is True
    assert stored["feature_dim"] == 1280 + len(tag_words())
    captioner = Captioner.from_checkpoint(ckpt)
    assert captioner.encoder.spec.tags
    photo = next((data / "Images").glob("*.jpg"))
    assert list(captioner.caption_images([photo]))[0][1].caption
