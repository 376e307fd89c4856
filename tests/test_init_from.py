"""Fine-tuning a trained model on new data (`captioner train --init-from`): the architecture, weights,
vocabulary and encoder come from the model, the training settings from --config (or the model's own
config), the words the new captions have and the vocabulary lacks are counted, and the run records its
source."""

import argparse
import csv
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner import checkpoint
from captioner.commands import train as train_command
from captioner.config import load_config
from captioner.data.records import load_records
from captioner.errors import CaptionerError
from captioner.train import loop as training
from captioner.train.init_from import init_config, report_unknown_words
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny GRU trained one epoch on the colour squares: the model to start from."""
    root = tmp_path_factory.mktemp("base")
    data = make_flickr_layout(root / "flickr")
    cfg = load_config(REPO / "configs" / "tiny.toml",
                      [f"data.root={data}", f"data.cache_dir={root / 'cache'}", "train.precision=fp32",
                       "train.epochs=1", "model.cell=gru", "model.hidden_dim=24", "model.embed_dim=16"])
    training.fit(cfg, root / "run")
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def new_photos(tmp_path_factory):
    """Eight photos of one folder (imagefolder csv, no val split) whose captions hold words the colour
    squares never had: 'teal', 'circle', 'in', 'middle'."""
    root = tmp_path_factory.mktemp("new") / "photos"
    root.mkdir()
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i in range(8):
            Image.new("RGB", (64, 48), (20, 120 + 10 * i, 120)).save(root / f"teal_{i}.jpg")
            w.writerow([f"teal_{i}.jpg", "a plain teal square fills the picture"])  # 1 unknown of 7
            w.writerow([f"teal_{i}.jpg", "a teal circle in the middle"])  # 4 unknown of 6
    return root


def test_config_takes_the_architecture_from_the_model(base_model, new_photos, caplog):
    with caplog.at_level(logging.INFO, logger="captioner"):
        cfg = init_config("tiny", [f"data.root={new_photos}", "train.epochs=2"], str(base_model))
    assert (cfg.model.cell, cfg.model.hidden_dim, cfg.model.embed_dim) == ("gru", 24, 16)
    assert cfg.train.epochs == 2 and cfg.train.lr == load_config("tiny").train.lr  # tiny's schedule
    assert cfg.train.init_from == str(base_model.resolve())
    lines = [r.getMessage() for r in caplog.records if "replace those of tiny" in r.getMessage()]
    assert lines == [f"--init-from {base_model}: its model and encoder replace those of tiny "
                     "(model.cell lstm -> gru, model.embed_dim 32 -> 16, model.hidden_dim 32 -> 24)"]
    # Without --config: the settings the model was trained with (tiny's, with one epoch), its own machine's
    # paths left out.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="captioner"):
        own = init_config(None, [f"data.root={new_photos}"], str(base_model))
    assert own.train.epochs == 1 and own.train.lr == cfg.train.lr and own.data.cache_dir == "cache"
    assert own.data.root == str(new_photos) and own.model == cfg.model
    assert "training settings from" in caplog.text and "replace those of" not in caplog.text
    # Asking for another architecture explicitly is a contradiction, said in one line.
    with pytest.raises(CaptionerError, match=r"--set model.cell=lstm: the architecture comes from --init-from "
                                             r".* \(model.cell = gru\)"):
        init_config("tiny", ["model.cell=lstm"], str(base_model))
    assert init_config("tiny", ["model.cell=gru"], str(base_model)).model.cell == "gru"  # agreeing is fine
    with pytest.raises(CaptionerError, match="--init-from nosuch: neither a checkpoint file nor a shipped model"):
        init_config("tiny", [], "nosuch")


def test_training_starts_from_the_weights_and_vocabulary_and_counts_unknown_words(base_model, new_photos,
                                                                                   tmp_path, caplog):
    cfg = init_config("tiny", [f"data.root={new_photos}", f"data.cache_dir={tmp_path / 'cache'}",
                               "train.precision=fp32", "train.epochs=1", "train.lr=1e-12", "train.warmup_steps=0"],
                      str(base_model))
    with caplog.at_level(logging.INFO, logger="captioner"):
        training.fit(cfg, tmp_path / "run")
    start, after = checkpoint.load_model(base_model), checkpoint.load_model(tmp_path / "run" / "last.pt")
    assert after.vocab == start.vocab  # the model's vocabulary, not one built from the new captions
    # lr 1e-12: the weights are the start's, not a fresh initialisation's
    for name, tensor in start.model.state_dict().items():
        assert torch.allclose(tensor, after.model.state_dict()[name], atol=1e-6), name
    # 7 train images (one held out) x (1 + 4) unknown tokens of 13; 'teal', 'circle', 'in', 'middle' distinct
    assert (f"35 of the 91 caption words of the training images (38.5%) are not in {base_model.resolve()}'s "
            f"vocabulary of {len(start.vocab)} words: 4 distinct words (most frequent: teal, circle, in, middle); "
            "they train as <unk>") in caplog.text
    assert f'init_from = "{base_model.resolve()}"' in (tmp_path / "run" / "config.toml").read_text()


def test_resume_before_the_first_checkpoint_starts_from_the_model_again(base_model, new_photos, tmp_path):
    run = tmp_path / "run"
    cfg = init_config("tiny", [f"data.root={new_photos}", f"data.cache_dir={tmp_path / 'cache'}",
                               "train.precision=fp32", "train.epochs=1", "train.lr=1e-12"], str(base_model))
    training.fit(cfg, run)
    for name in ("last.pt", "best.pt", "log.jsonl"):  # as if killed before its first epoch ended
        (run / name).unlink()
    training.fit(None, run, resume=True)
    start, after = checkpoint.load_model(base_model), checkpoint.load_model(run / "last.pt")
    assert after.vocab == start.vocab
    assert torch.allclose(start.model.embed.weight, after.model.embed.weight, atol=1e-6)


def test_cli_refuses_init_from_with_resume_and_a_model_of_other_features(base_model, tmp_path):
    args = argparse.Namespace(resume=str(tmp_path), config=None, data=None, set=[], init_from=str(base_model),
                              run_dir=None)
    with pytest.raises(CaptionerError, match="--resume takes the run's own config; drop .*--init-from"):
        train_command.run(args)
    # A config naming train.init_from with another model section than the model's is refused by fit.
    cfg = load_config("tiny", [f"train.init_from={base_model}", f"data.root={tmp_path}"])
    with pytest.raises(CaptionerError, match=r"a checkpoint of another architecture .*model.cell: gru vs lstm"):
        training.fit(cfg, tmp_path / "run")


def test_shipped_model_on_coco_mini_config_and_unknown_words(coco_mini_root, caplog):
    cfg = init_config("tiny", [f"data.root={coco_mini_root}"], "flickr8k")
    assert (cfg.model.cell, cfg.model.conditioning, cfg.model.hidden_dim) == ("gru", "both", 512)
    assert cfg.encoder.name == "efficientnet_lite0" and cfg.train.init_from == "flickr8k"
    assert cfg.train.epochs == load_config("tiny").train.epochs
    shipped = checkpoint.load_model(REPO / "captioner" / "pretrained" / "flickr8k.pt")
    records = load_records(coco_mini_root)
    with caplog.at_level(logging.INFO, logger="captioner"):
        counts = report_unknown_words(records, shipped.vocab, "flickr8k")
    assert counts["tokens"] > 3000 and 0 < counts["unknown_tokens"] < counts["tokens"]
    assert counts["unknown_words"] > 10 and "they train as <unk>" in caplog.text
