"""`fit` as its three steps: restore a run, build it, run it with callbacks at every epoch's end."""

import json
from pathlib import Path

import pytest

from tiny_data import make_flickr_layout
from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.train import loop

REPO = Path(__file__).resolve().parents[1]


def test_run_hands_every_epoch_to_its_callbacks_and_restore_finds_where_it_stopped(tmp_path):
    data = make_flickr_layout(tmp_path / "data")
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={tmp_path / 'cache'}",
                                                       "train.epochs=2", "train.device=cpu", "train.precision=fp32"])
    run_dir = tmp_path / "run"
    cfg, restored = loop.restore(cfg, run_dir, resume=False)
    assert restored is None
    built = loop.build(cfg, run_dir, restored)
    seen = []
    entry = loop.run(built, [loop.write_epoch_end,
                             lambda run, end: seen.append((run.progress.epoch, end.entry, end.improved))])
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e for _, e, _ in seen] == log and entry == log[-1]  # the callback saw what the log holds
    assert [epoch for epoch, _, _ in seen] == [1, 2] and [b for _, _, b in seen] == [e["best"] for e in log]

    again, restored = loop.restore(None, run_dir, resume=True)
    assert again.train.epochs == 2 and restored.path == run_dir / "last.pt" and restored.holdout is None
    assert (restored.state.epoch, restored.state.step) == (2, entry["step"])
    built = loop.build(again, run_dir, restored)
    assert built.progress.epoch == 2 and built.trainer.step == entry["step"]
    assert loop.run(built, [loop.write_epoch_end]) == {}  # nothing left to train

    with pytest.raises(CaptionerError, match="already holds a run"):
        loop.restore(cfg, run_dir, resume=False)
    with pytest.raises(CaptionerError, match="nothing to resume"):
        loop.restore(None, tmp_path / "empty", resume=True)


def test_a_run_without_the_writing_callback_writes_no_checkpoint(tmp_path):
    data = make_flickr_layout(tmp_path / "data")
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={tmp_path / 'cache'}",
                                                       "train.epochs=1", "train.device=cpu", "train.precision=fp32"])
    built = loop.build(cfg, tmp_path / "run", None)
    entry = loop.run(built)
    assert entry["epoch"] == 1 and not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "log.jsonl").exists()
