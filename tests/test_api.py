"""The three-line Python API: `from captioner import Captioner; cap = Captioner.from_pretrained(); cap(x)`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "skateboarder.jpg"


@pytest.fixture(scope="module")
def cap():
    from captioner import Captioner

    return Captioner.from_pretrained(device="cpu")


def test_the_three_lines_of_the_readme(monkeypatch):
    monkeypatch.chdir(REPO / "examples")  # "photo.jpg" in the README: a file in the working folder
    from captioner import Captioner
    cap = Captioner.from_pretrained()
    caption = cap("skateboarder.jpg")
    assert isinstance(caption, str) and 3 <= len(caption.split()) <= 20 and "<unk>" not in caption
    assert {"man", "boy", "person", "skateboarder", "skater"} & set(caption.split()), caption


def test_import_captioner_loads_no_torch():
    code = "import sys, captioner; assert 'torch' not in sys.modules; print(captioner.__version__)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_input_kind_gives_the_same_caption(cap):
    rgb = Image.open(PHOTO).convert("RGB")
    array = np.asarray(rgb)
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    by_path = cap(PHOTO)
    assert cap(str(PHOTO)) == by_path
    assert cap(rgb) == by_path
    assert cap(array) == by_path
    assert cap(chw) == by_path
    assert cap(chw.float() / 255.0) == by_path
    assert cap(Image.open(PHOTO).convert("L")) != ""  # grayscale is converted, not refused


def test_a_list_is_captioned_in_batches_in_order(cap):
    photos = sorted((REPO / "examples").glob("*.jpg"))
    one_by_one = [cap(p) for p in photos]
    assert cap(photos * 2, batch_size=4) == one_by_one * 2
    assert cap([]) == []


def test_n_best_gives_captions_with_scores_best_first(cap):
    best = cap(PHOTO, n_best=3)
    # the shipped model's neighbour index adds each caption's consensus and confidence (captioner.model.rerank),
    # the open vocabulary the tags each caption says (captioner.model.open_vocab)
    assert len(best) == 3 and all(set(h) == {"caption", "score", "consensus", "confidence", "tags"} for h in best)
    assert all(t["word"] in h["caption"].split() and 0 <= t["probability"] <= 1 for h in best for t in h["tags"])
    scores = [h["score"] for h in best]
    assert scores == sorted(scores, reverse=True) and len({h["caption"] for h in best}) == 3
    assert best[0]["caption"] == cap(PHOTO)
    assert len(cap(PHOTO, n_best=5)) == 5  # the beam widens to the n-best asked for
    [listed] = cap([PHOTO], n_best=2)
    assert [h["caption"] for h in listed] == [h["caption"] for h in best[:2]]


def test_decoding_options_are_honoured(cap):
    assert len(cap(PHOTO, max_len=3).split()) <= 3
    greedy = cap(PHOTO, beam_size=1)
    assert isinstance(greedy, str) and greedy
    long = cap(PHOTO, length_penalty=2.0, beam_size=5)
    assert isinstance(long, str)


@pytest.mark.parametrize("bad,named", [
    (42, "int"),
    (None, "NoneType"),
    (np.zeros((8, 8, 3), np.float32), "float32"),
    (np.zeros((8, 8, 5), np.uint8), "(8, 8, 5)"),
    (torch.zeros(2, 3, 8, 8), "(2, 3, 8, 8)"),
    (torch.full((3, 8, 8), 7.0), "outside [0, 1]"),
    ("no/such/photo.jpg", "no/such/photo.jpg"),
])
def test_bad_input_raises_captioner_error_naming_it(cap, bad, named):
    from captioner import CaptionerError

    with pytest.raises(CaptionerError) as info:
        cap(bad)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_bad_item_in_a_list_is_named_by_its_position(cap):
    from captioner import CaptionerError

    with pytest.raises(CaptionerError, match=r"images\[1\]"):
        cap([PHOTO, np.zeros((4, 4), np.float64)])


def test_not_an_image_file(cap, tmp_path):
    from captioner import CaptionerError

    fake = tmp_path / "fake.jpg"
    fake.write_text("not a photo")
    with pytest.raises(CaptionerError, match="fake.jpg: not an image"):
        cap(fake)


@pytest.mark.parametrize("kwargs,message", [
    ({"n_best": 0}, "n_best"), ({"beam_size": 0}, "beam_size"), ({"max_len": 0}, "max_len"),
    ({"n_best": 4, "beam_size": 2}, "n-best"),
])
def test_bad_options_are_refused(cap, kwargs, message):
    from captioner import CaptionerError

    with pytest.raises(CaptionerError, match=message):
        cap(PHOTO, **kwargs)


def test_from_pretrained_names_paths_and_devices(tmp_path):
    from captioner import Captioner, CaptionerError
    from captioner.inference import default_checkpoint

    assert Captioner.from_pretrained("flickr8k", device="cpu").device == torch.device("cpu")
    assert Captioner.from_pretrained(default_checkpoint(), device="cpu")(PHOTO)
    with pytest.raises(CaptionerError, match="neither a checkpoint file nor a shipped model.*flickr8k"):
        Captioner.from_pretrained("no-such-model")
    with pytest.raises(CaptionerError, match="unknown device 'tpu'"):
        Captioner.from_pretrained(device="tpu")
    auto = Captioner.from_pretrained(device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CaptionerError, match="no CUDA device"):
            Captioner.from_pretrained(device="cuda")
