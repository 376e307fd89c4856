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
from captioner.inference import Captioner
from captioner.train.init_from import extend_vocabulary, init_config, report_new_words
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


def _fine_tune(base_model, new_photos, tmp_path, *sets, run="run"):
    cfg = init_config("tiny", [f"data.root={new_photos}", f"data.cache_dir={tmp_path / 'cache'}",
                               "train.precision=fp32", *sets], str(base_model))
    training.fit(cfg, tmp_path / run)
    return checkpoint.load_model(base_model), checkpoint.load_model(tmp_path / run / "last.pt")


NEW = ["teal", "circle", "in", "middle"]  # the new captions' words the colour squares never had, by count


def test_new_words_join_the_vocabulary_and_the_old_words_keep_ids_and_rows(base_model, new_photos, tmp_path,
                                                                           caplog):
    with caplog.at_level(logging.INFO, logger="captioner"):
        start, after = _fine_tune(base_model, new_photos, tmp_path, "train.epochs=1", "train.lr=1e-12",
                                  "train.warmup_steps=0")
    V = len(start.vocab)
    assert after.vocab.words == start.vocab.words + tuple(NEW)  # appended: every old word keeps its id
    # lr 1e-12: the weights are the start's, not a fresh initialisation's, and the old rows are the old rows
    grown = {"embed.weight", "out.weight", "out.bias"}
    for name, tensor in start.model.state_dict().items():
        now = after.model.state_dict()[name]
        assert torch.allclose(tensor, now[:V] if name in grown else now, atol=1e-6), name
    # train.new_words = "unk" (the default): each new word starts from <unk>'s rows
    unk = start.vocab.unk_id
    for name in grown:
        new_rows, unk_row = after.model.state_dict()[name][V:], start.model.state_dict()[name][unk]
        assert new_rows.shape[0] == len(NEW) and torch.allclose(new_rows, unk_row.expand_as(new_rows), atol=1e-6)
    # 7 train images (one held out) x (1 + 4) words of 13, all now known; one line says what was added
    assert (f"added 4 words to {base_model.resolve()}'s vocabulary of {V} (those of the training captions seen at "
            "least 1 times (data.min_count) that it lacked: teal, circle, in, middle); 0 of the 91 caption words "
            "of the training images (0.0%) remain unknown: 0 distinct words; they train as <unk>") in caplog.text
    assert f'init_from = "{base_model.resolve()}"' in (tmp_path / "run" / "config.toml").read_text()


def test_new_rows_from_the_mean_of_the_old_ones_or_no_new_words(base_model, new_photos, tmp_path, caplog):
    start, mean = _fine_tune(base_model, new_photos, tmp_path, "train.epochs=1", "train.lr=1e-12",
                             "train.warmup_steps=0", "train.new_words=mean", run="mean")
    V, old = len(start.vocab), start.model.state_dict()
    for name in ("embed.weight", "out.weight"):
        new_rows, mean_row = mean.model.state_dict()[name][V:], old[name][4:].mean(dim=0)
        assert torch.allclose(new_rows, mean_row.expand_as(new_rows), atol=1e-6), name
    bias = mean.model.out.bias[V:]
    assert torch.allclose(bias, torch.quantile(old["out.bias"][4:], 0.1).expand_as(bias), atol=1e-6)
    # A word seen fewer than data.min_count times stays out: at 8, only 'teal' (14 uses) is added.
    start, eight = _fine_tune(base_model, new_photos, tmp_path, "train.epochs=1", "data.min_count=8", run="eight")
    assert eight.vocab.words == start.vocab.words + ("teal",)
    # off: the model's own vocabulary, new words train as <unk> (the line says so)
    with caplog.at_level(logging.INFO, logger="captioner"):
        start, off = _fine_tune(base_model, new_photos, tmp_path, "train.epochs=1", "train.new_words=off",
                                run="off")
    assert off.vocab == start.vocab
    assert (f"added no word to {base_model.resolve()}'s vocabulary of {len(start.vocab)} (train.new_words = off); "
            "35 of the 91 caption words of the training images (38.5%) remain unknown: 4 distinct words (most "
            "frequent: teal, circle, in); they train as <unk>") in caplog.text
    with pytest.raises(CaptionerError, match="train.new_words must be one of unk, mean, off, got 'zero'"):
        load_config("tiny", ["train.new_words=zero"])


def test_the_extended_model_learns_a_new_word_round_trips_and_resumes(base_model, new_photos, tmp_path):
    start, after = _fine_tune(base_model, new_photos, tmp_path, "train.epochs=6", "train.lr=1e-2")
    assert after.vocab.words[len(start.vocab):] == tuple(NEW)
    cap = Captioner.from_checkpoint(tmp_path / "run" / "best.pt")
    assert cap.vocab == after.vocab
    captions = [c.caption for _, c in cap.caption_images(sorted(new_photos.glob("teal_*.jpg"))[:3], beam_size=3)]
    assert all("teal" in c.split() for c in captions), captions
    # The exported model keeps the extended vocabulary and its rows.
    small = checkpoint.load_model(checkpoint.export(tmp_path / "run" / "best.pt", tmp_path / "small.pt"))
    assert small.vocab == after.vocab and small.model.out.weight.shape[0] == len(after.vocab)
    # --resume continues with the extended vocabulary and weights (not the start's), one more epoch.
    payload = checkpoint.read(tmp_path / "run" / "last.pt")
    payload["config"]["train"]["epochs"] = 7
    checkpoint.save(tmp_path / "run" / "last.pt", payload)
    entry = training.fit(None, tmp_path / "run", resume=True)
    assert entry["epoch"] == 7 and checkpoint.load_model(tmp_path / "run" / "last.pt").vocab == after.vocab


def test_resume_before_the_first_checkpoint_starts_from_the_model_again(base_model, new_photos, tmp_path):
    run = tmp_path / "run"
    cfg = init_config("tiny", [f"data.root={new_photos}", f"data.cache_dir={tmp_path / 'cache'}",
                               "train.precision=fp32", "train.epochs=1", "train.lr=1e-12"], str(base_model))
    training.fit(cfg, run)
    for name in ("last.pt", "best.pt", "log.jsonl"):  # as if killed before its first epoch ended
        (run / name).unlink()
    training.fit(None, run, resume=True)
    start, after = checkpoint.load_model(base_model), checkpoint.load_model(run / "last.pt")
    assert after.vocab.words == start.vocab.words + tuple(NEW)
    assert torch.allclose(start.model.embed.weight, after.model.embed.weight[:len(start.vocab)], atol=1e-6)


def test_cli_refuses_init_from_with_resume_and_a_model_of_other_features(base_model, tmp_path):
    args = argparse.Namespace(resume=str(tmp_path), config=None, data=None, set=[], init_from=str(base_model),
                              run_dir=None)
    with pytest.raises(CaptionerError, match="--resume takes the run's own config; drop .*--init-from"):
        train_command.run(args)
    # A config naming train.init_from with another model section than the model's is refused by fit.
    cfg = load_config("tiny", [f"train.init_from={base_model}", f"data.root={tmp_path}"])
    with pytest.raises(CaptionerError, match=r"a checkpoint of another architecture .*model.cell: gru vs lstm"):
        training.fit(cfg, tmp_path / "run")


def test_shipped_model_on_coco_mini_config_and_new_words(coco_mini_root, caplog):
    cfg = init_config("tiny", [f"data.root={coco_mini_root}"], "flickr8k")
    assert (cfg.model.cell, cfg.model.conditioning, cfg.model.hidden_dim) == ("gru", "both", 512)
    assert cfg.encoder.name == "efficientnet_lite0" and cfg.train.init_from == "flickr8k"
    assert cfg.train.epochs == load_config("tiny").train.epochs
    shipped = checkpoint.load_model(REPO / "captioner" / "pretrained" / "flickr8k.pt")
    records = load_records(coco_mini_root)
    extended, added = extend_vocabulary(shipped.vocab, records, min_count=3)
    assert extended.words[:len(shipped.vocab)] == shipped.vocab.words and len(added) > 10
    with caplog.at_level(logging.INFO, logger="captioner"):
        counts = report_new_words(records, extended, added, "flickr8k", 3)
    assert counts["tokens"] > 3000 and 0 < counts["unknown_tokens"] < counts["tokens"]
    assert counts["added"] == len(added) and f"added {len(added)} words to flickr8k's vocabulary" in caplog.text


def test_new_rows_take_larger_steps_and_the_old_rows_the_same():
    """boost_new_rows: one AdamW step from the same weights and gradients moves the rows from `first` on
    `scale` times as far, every other weight exactly as far (tied weights too)."""
    from captioner.config import ModelConfig
    from captioner.model.decoder import CaptionDecoder
    from captioner.train.init_from import boost_new_rows

    for tied in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(cell="gru", embed_dim=8, hidden_dim=8, dropout=0.0, tie_weights=tied)
        models = [CaptionDecoder(cfg, vocab_size=12, feature_dim=5) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        start = {k: v.clone() for k, v in models[0].state_dict().items()}
        feats, inputs = torch.randn(3, 5), torch.randint(1, 12, (3, 6))
        for model, scale in zip(models, (1.0, 10.0)):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            boost_new_rows(optimizer, model, first=9, scale=scale)
            model(feats, inputs).square().mean().backward()
            optimizer.step()
        plain, boosted = models[0].state_dict(), models[1].state_dict()
        for name in start:
            d_plain, d_boost = plain[name] - start[name], boosted[name] - start[name]
            if name in ("embed.weight", "out.weight", "out.bias"):
                assert torch.allclose(d_boost[9:], 10 * d_plain[9:], rtol=1e-3, atol=1e-6), name
                assert d_plain[9:].abs().sum() > 0 and torch.equal(d_boost[:9], d_plain[:9]), name
            else:
                assert torch.equal(d_boost, d_plain), name
