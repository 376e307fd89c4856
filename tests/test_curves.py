"""Run logs read back: the curves PNG and the runs table pick each run's best epoch."""

import json

import pytest

from captioner.curves import plot_curves, runs_table
from captioner.errors import CaptionerError


def write_run(path, cider):
    path.mkdir()
    lines = [{"epoch": i + 1, "train_loss": 4 - i, "val_loss": 4.5 - i, "val_BLEU-1": 50 + i, "val_BLEU-2": 30,
              "val_BLEU-3": 20, "val_BLEU-4": 10 + i, "val_ROUGE-L": 40, "val_CIDEr": c, "train_seconds": 10}
             for i, c in enumerate(cider)]
    (path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return path


def test_curves_png_and_table(tmp_path):
    a = write_run(tmp_path / "a", [10, 30, 20])
    b = write_run(tmp_path / "b", [5, 6])
    png = plot_curves(a / "log.jsonl", a / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = runs_table([a, b]).splitlines()
    assert table[2].startswith("| a | 3 | 2 | 51.0 |") and "| 30.0 | 30 |" in table[2]
    assert table[3].startswith("| b | 2 | 2 |")
    with pytest.raises(CaptionerError, match="no log.jsonl"):
        runs_table([tmp_path])
