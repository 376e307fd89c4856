"""A tiny dataset through the whole pipeline: train.py -> checkpoint -> resume -> caption.py -> evaluate.py.

The images are flat colours whose captions name the colour, so a small decoder on real EfficientNet-Lite0
features learns them within a few epochs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.config import load_config
from captioner.train import loop as training
from captioner.train import step as train_step
from tiny_data import COLOURS, make_flickr_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_flickr_layout(tmp_path_factory.mktemp("tiny") / "flickr")


def tiny_config(data: Path, cache: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.toml",
                       [f"data.root={data}", f"data.cache_dir={cache}", *extra])


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_cli_writes_run_dir_and_checkpoint_rebuilds(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", "--config", "configs/tiny.toml", "--data", str(tiny_data), "--run-dir",
                   str(run_dir), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "config.toml").is_file() and (run_dir / "last.pt").is_file()
    assert (run_dir / "best.pt").is_file()
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2]
    assert {"train_loss", "val_loss", "val_BLEU-4", "val_CIDEr"} <= set(lines[-1])
    loaded = checkpoint.load_model(run_dir / "last.pt")  # no training flags needed
    assert loaded.model.cfg.embed_dim == 32 and len(loaded.vocab) > 4
    # A second train.py into the same run dir refuses instead of overwriting.
    again = run_cli("train.py", "--config", "configs/tiny.toml", "--data", str(tiny_data), "--run-dir",
                    str(run_dir))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = tiny_config(tiny_data, cache, "train.epochs=4", "model.dropout=0.3")
    full = training.fit(cfg, tmp_path / "full")

    real = train_step.train_one_epoch
    calls = {"n": 0}

    def crash_on_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed in the middle of epoch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step, "train_one_epoch", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        training.fit(cfg, tmp_path / "resumed")
    monkeypatch.setattr(train_step, "train_one_epoch", real)
    resumed = training.fit(None, tmp_path / "resumed", resume=True)

    assert resumed["epoch"] == full["epoch"] == 4
    assert abs(resumed["train_loss"] - full["train_loss"]) < 1e-6
    a = checkpoint.read(tmp_path / "full" / "last.pt")["model"]
    b = checkpoint.read(tmp_path / "resumed" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_learns_colours_then_caption_and_evaluate_clis(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    # Selected on the dev loss: the tiny dev split's BLEU-4 reaches 100 (a tie) epochs before every colour
    # is learned, so selecting on it keeps whichever epoch first tied, which depends on rounding (fp32 or
    # bf16, the loss's summation order).
    cfg = tiny_config(tiny_data, cache, "train.epochs=30", "train.lr=1e-2", "model.hidden_dim=64",
                      "model.embed_dim=64", "train.precision=fp32", "train.select_metric=loss")
    final = training.fit(cfg, tmp_path / "run")
    assert final["val_BLEU-4"] > 50, final  # the colour words are learned, not guessed
    ckpt = tmp_path / "run" / "best.pt"

    images = sorted((tiny_data / "Images").glob("*_0.jpg"))
    bad = tmp_path / "not an image.jpg"
    bad.write_text("hello")
    proc = run_cli("caption.py", *map(str, images), str(bad), "--checkpoint", str(ckpt), "--precision", "fp32")
    assert proc.returncode == 1  # one file failed
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    lines = dict(line.split("\t") for line in proc.stdout.strip().splitlines())
    assert len(lines) == len(images)
    for path, caption in lines.items():
        colour = Path(path).stem.split("_")[0]
        assert colour in caption.split(), (path, caption)

    out = tmp_path / "eval.json"
    proc = run_cli("evaluate.py", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--precision", "fp32",
                   "--split", "dev",
                   "--cache-dir", str(cache), "--json", str(out), "--no-meteor")
    assert proc.returncode == 0, proc.stderr
    assert "BLEU-4" in proc.stdout and "CIDEr" in proc.stdout
    report = json.loads(out.read_text())
    assert report["images"] == len(COLOURS)
    assert len(report["per_image"]) == len(COLOURS)
    assert report["totals"]["BLEU-4"] > 50


def test_fine_tuning_the_encoder_trains_it_and_the_checkpoint_captions_with_it(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "cache", "train.epochs=1", "encoder.fine_tune=1",
                      "encoder.fine_tune_lr_scale=1.0")
    final = training.fit(cfg, tmp_path / "run")
    assert final["epoch"] == 1
    assert not (tmp_path / "cache").exists()  # the cache is bypassed while the encoder trains
    ckpt = checkpoint.read(tmp_path / "run" / "last.pt")
    assert "finetuned-" in ckpt["encoder"]["weights"]
    from captioner.vision.encoders import build_encoder
    pretrained = build_encoder(ckpt["encoder"]["name"]).state_dict()
    changed = [k for k, v in ckpt["encoder_state"].items() if v.is_floating_point() and not torch.equal(v, pretrained[k])]
    assert changed, "fine-tuning left every encoder weight as it was"

    from captioner.inference import Captioner
    captioner = Captioner.from_checkpoint(tmp_path / "run" / "last.pt")
    results = list(captioner.caption_images(sorted((tiny_data / "Images").glob("*_0.jpg")), beam_size=2))
    assert len(results) == 4 and all(r.caption for _, r in results)
