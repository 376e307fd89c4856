"""What one photo from a cold start does not pay for: torchvision and torch's compiler stack, the metrics'
and plotting libraries, and a random initialisation of weights that the checkpoint replaces.
benchmarks/cold_start.py measures the time; these check the causes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint, no_init
from captioner.errors import CaptionerError
from captioner.vision.encoders import build_encoder

REPO = Path(__file__).resolve().parents[1]
NOT_NEEDED = ("torchvision", "torch._dynamo", "sympy", "matplotlib", "nltk", "pycocoevalcap", "pycocotools")


def test_captioning_a_photo_imports_none_of_what_it_does_not_need():
    code = ("import sys\nfrom captioner.cli import main\n"
            "try:\n    main(['caption', '--checkpoint', 'flickr8k', 'examples/street.jpg'])\n"
            "except SystemExit as done:\n"
            f"    print(done.code, sorted(m for m in {NOT_NEEDED!r} if m in sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("examples/street.jpg\t"), done.stderr
    assert done.stderr.splitlines()[-1] == "0 []"


@pytest.fixture
def drawn(monkeypatch):
    """The names of torch.nn.init's initialisers called while the test runs (outside without_random_init)."""
    calls = []
    for name in no_init.INITIALISERS:
        real = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name,
                            lambda *args, _name=name, _real=real, **kwargs: (calls.append(_name), _real(*args, **kwargs))[1])
    return calls


def test_loading_a_model_and_building_the_cnn_draw_no_random_weights(drawn):
    loaded = checkpoint.load_model(checkpoint.pretrained_path("flickr8k"))
    encoder = build_encoder(loaded.encoder_spec().name)
    assert drawn == []
    torch.nn.Linear(2, 2)  # outside: the initialisers run (and are recorded) as usual
    assert drawn == ["kaiming_uniform_", "uniform_"]
    assert not encoder.training and encoder.frozen


def test_a_loaded_decoder_holds_exactly_the_stored_weights_and_init_is_restored():
    initialisers = {name: getattr(torch.nn.init, name) for name in no_init.INITIALISERS}
    path = checkpoint.pretrained_path("flickr8k")
    stored = checkpoint.read(path)["model"]
    loaded = checkpoint.load_model(path).model.state_dict()
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], v.float()) for k, v in stored.items())
    bad = checkpoint.read(path)
    bad["model"] = {k: v for k, v in bad["model"].items() if k != "out.bias"}
    with pytest.raises(CaptionerError, match="missing 1 weights"):  # never a model with undrawn weights
        checkpoint.build_model(bad, path)
    assert {name: getattr(torch.nn.init, name) for name in initialisers} == initialisers
    w = torch.empty(8, 8)
    torch.nn.init.orthogonal_(w)
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)  # the real one again
