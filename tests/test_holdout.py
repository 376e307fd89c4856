"""A dataset without a val split: a seeded slice of its training images is held out as dev, by image,
recorded in the run directory and the checkpoints, reused by --resume and by evaluate."""

import argparse
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from captioner import checkpoint
from captioner.cli import build_parser
from captioner.commands import evaluate as evaluate_command
from captioner.config import load_config
from captioner.data import holdout
from captioner.data.records import Record
from captioner.errors import CaptionerError
from captioner.train import loop as training
from captioner.train.sources import prepare_data
from captioner.precision import FP32
from tiny_data import make_imagefolder_layout

REPO = Path(__file__).resolve().parents[1]


def records(root: Path, n: int, split: str = "train") -> list[Record]:
    return [Record(image=root / "images" / f"{i:03d}.jpg", captions=(f"caption {i}", f"another {i}"), split=split)
            for i in range(n)]


def test_choose_is_seeded_by_image_and_stable(tmp_path):
    recs = records(tmp_path, 80)
    a = holdout.choose(recs, tmp_path, 0.05, seed=0)
    assert len(a.images) == 4 and a.of == 80 and a.split == "train"
    assert all(p.startswith("images/") for p in a.images)  # relative to the root: the same on every machine
    assert holdout.choose(list(reversed(recs)), tmp_path, 0.05, seed=0) == a  # order of the records is moot
    assert holdout.choose(recs, tmp_path, 0.05, seed=1).images != a.images
    assert len(holdout.choose(recs, tmp_path, 0.2, seed=0).images) == 16
    assert len(holdout.choose(recs[:3], tmp_path, 0.05, seed=0).images) == 1  # at least one
    assert len(holdout.choose(recs[:2], tmp_path, 0.9, seed=0).images) == 1  # never all of them
    # An image keeps its side when others are added: the slice of 160 images contains the old one's
    # images that still rank lowest.
    more = holdout.choose(records(tmp_path, 160), tmp_path, 0.05, seed=0)
    assert set(a.images) <= set(more.images)
    # Several captions of one image never split across train and dev: the choice is by image.
    doubled = recs + [Record(r.image, ("yet another",), "train") for r in recs]
    relabelled, missing = holdout.choose(doubled, tmp_path, 0.05, 0).apply(doubled, tmp_path)
    assert not missing
    val_images = {r.image for r in relabelled if r.split == "val"}
    assert len(val_images) == 4 and not val_images & {r.image for r in relabelled if r.split == "train"}


def test_choose_refuses_what_cannot_work(tmp_path):
    with pytest.raises(CaptionerError, match="too few to hold one out"):
        holdout.choose(records(tmp_path, 1), tmp_path, 0.05, 0)
    with pytest.raises(CaptionerError, match="data.holdout must be above 0"):
        holdout.choose(records(tmp_path, 10), tmp_path, 0.0, 0)


def test_apply_matches_from_a_folder_above_and_reports_missing(tmp_path):
    recs = records(tmp_path / "data", 20)
    held = holdout.choose(recs, tmp_path / "data", 0.1, 0)
    # evaluate pointed one folder above the dataset that training read
    out, missing = held.apply(recs, tmp_path)
    assert not missing and sorted(str(r.image.relative_to(tmp_path / "data")) for r in out if r.split == "val") \
        == sorted(held.images)
    gone = [r for r in recs if r.image.relative_to(tmp_path / "data").as_posix() != held.images[0]]
    out, missing = held.apply(gone, tmp_path / "data")
    assert missing == [held.images[0]] and sum(r.split == "val" for r in out) == 1
    assert holdout.Holdout.from_dict(held.to_dict()) == held
    with pytest.raises(CaptionerError, match="damaged record"):
        holdout.Holdout.from_dict({"images": []}, "x.pt")


@pytest.fixture(scope="module")
def no_val_data(tmp_path_factory):
    """12 colour squares in one folder with a metadata.csv: everything is train."""
    return make_imagefolder_layout(tmp_path_factory.mktemp("noval") / "photos", "csv")


def cfg_for(data, cache, *extra):
    return load_config(REPO / "configs" / "tiny.toml",
                       [f"data.root={data}", f"data.cache_dir={cache}", "train.precision=fp32", *extra])


def test_prepare_data_never_trains_on_the_held_out_images(no_val_data, tmp_path):
    cfg = cfg_for(no_val_data, tmp_path / "cache", "data.holdout=0.25", "data.holdout_seed=3")
    data = prepare_data(cfg, precision=FP32)
    assert data.holdout is not None and len(data.holdout.images) == 3 and data.holdout.of == 12
    held = {no_val_data / p for p in data.holdout.images}
    assert {r.image for r in data.val} == held
    assert not held & {r.image for r in data.train} and len(data.train) == 9
    # The training rows (what the loader reads) hold none of the held-out images' features.
    assert not set(data.features.rows(data.train)) & set(data.features.rows(data.val))
    # Without a holdout, the old one-line error, now saying how to get dev images.
    with pytest.raises(CaptionerError, match="no val/dev images to select a model on .*data.holdout"):
        prepare_data(cfg_for(no_val_data, tmp_path / "cache", "data.holdout=0"), precision=FP32)


def test_fit_records_the_slice_and_resume_keeps_it(tmp_path, caplog):
    data = make_imagefolder_layout(tmp_path / "photos", "csv")
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="captioner"):
        training.fit(cfg_for(data, tmp_path / "cache", "train.epochs=1", "data.holdout=0.2"), run)
    listed = holdout.read_listed(run / holdout.FILE_NAME)
    assert len(listed) == 2
    assert f"has no val split: held out 2 of the 12 train images as dev (data.holdout = 0.2, seed 0); " \
           f"listed in {run / holdout.FILE_NAME}" in caplog.text
    for name in ("best.pt", "last.pt"):
        stored = holdout.Holdout.from_dict(checkpoint.read(run / name)["holdout"])
        assert list(stored.images) == listed
    exported = checkpoint.export(run / "best.pt", tmp_path / "small.pt")
    assert checkpoint.read(exported)["holdout"]["images"] == listed

    # New photos arrive; the resumed run keeps the dev images it started with, and says so.
    for i in range(8):
        Image.new("RGB", (64, 48), (10 * i, 100, 100)).save(data / f"new_{i}.jpg")
    with open(data / "metadata.csv", "a") as f:
        f.writelines(f"new_{i}.jpg,a plain teal square fills the picture\n" for i in range(8))
    caplog.clear()
    # --resume reads the run's config from last.pt: give it one more epoch there.
    payload = checkpoint.read(run / "last.pt")
    payload["config"]["train"]["epochs"] = 2
    checkpoint.save(run / "last.pt", payload)
    with caplog.at_level(logging.INFO, logger="captioner"):
        entry = training.fit(None, run, resume=True)
    assert entry["epoch"] == 2
    assert "the training images changed since this run started (20 now, 12 then); keeping the dev images" \
        in caplog.text
    assert holdout.read_listed(run / holdout.FILE_NAME) == listed
    assert checkpoint.read(run / "last.pt")["holdout"]["images"] == listed

    # A held-out image that has gone makes resuming an error, not a silently different dev set.
    (data / listed[0]).unlink()
    with pytest.raises(CaptionerError, match="1 of the 2 held-out dev images this run started with are no longer"):
        training.fit(None, run, resume=True)


def eval_args(**kw):
    """`captioner evaluate`'s arguments as its parser gives them, greedy and plain (no guards, no reranking)."""
    base = vars(build_parser().parse_args(["evaluate", "--data", ""]))
    base.update(no_meteor=True, beam_size=1, device="cpu", precision="fp32", no_repeat_ngram=0, repeat_guard=False,
                end_guard=False, rerank=0)
    return argparse.Namespace(**{**base, **kw})


def test_evaluate_scores_the_recorded_slice(no_val_data, tmp_path, caplog):
    run = tmp_path / "run"
    training.fit(cfg_for(no_val_data, tmp_path / "cache", "train.epochs=1", "data.holdout=0.25"), run)
    listed = holdout.read_listed(run / holdout.FILE_NAME)
    ckpt = str(run / "best.pt")
    scored = {}
    for split in ("val", None, "train"):
        out = tmp_path / f"{split}.json"
        with caplog.at_level(logging.INFO, logger="captioner"):
            evaluate_command.run(eval_args(checkpoint=[ckpt], data=str(no_val_data), split=split, json=str(out),
                                           cache_dir=str(tmp_path / "cache")))
        result = json.loads(out.read_text())
        scored[split] = ({Path(e["image"]).relative_to(no_val_data).as_posix() for e in result["per_image"]},
                         result["split"])
    assert scored["val"] == (set(listed), "val")
    assert scored[None] == (set(listed), "val")  # no test split: val, the held-out slice
    assert scored["train"][1] == "train" and len(scored["train"][0]) == 9
    assert not scored["train"][0] & set(listed)  # train here means what the model trained on
    assert f"has no val split: val is the 3 training images that {ckpt} held out as dev (data.holdout = 0.25, " \
           "seed 0), train the others" in caplog.text
    # The shipped model records no slice: the data has no val split to score.
    with pytest.raises(CaptionerError, match="no val split"):
        evaluate_command.run(eval_args(data=str(no_val_data), split="val", cache_dir=str(tmp_path / "cache")))
