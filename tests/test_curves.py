"""Run logs read back: the curves PNG and the runs table pick each run's best epoch."""

import json

import pytest

from captioner.analysis.curves import plot_curves, runs_table
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


def test_table_from_evaluation_files_and_curves_mark_scst(tmp_path):
    a = write_run(tmp_path / "a", [10, 30, 20])
    b = write_run(tmp_path / "b", [5, 6])
    totals = {"BLEU-1": 61.25, "BLEU-2": 42, "BLEU-3": 28, "BLEU-4": 18.8, "METEOR": 18.5, "ROUGE-L": 44,
              "CIDEr": 43.99}
    (a / "eval.json").write_text(json.dumps({"totals": totals}))
    table = runs_table([a, b], eval_name="eval.json").splitlines()
    assert "METEOR" in table[0]
    assert table[2] == "| a | 3 | 2 | 61.2 | 42.0 | 28.0 | 18.8 | 18.5 | 44.0 | 44.0 | 30 |"
    assert table[3] == "| b | 2 | 2 |  |  |  |  |  |  |  | 20 |"  # no evaluation file: blanks, not zeros
    # An SCST epoch's policy loss is left out of the cross-entropy panel; the plot still renders.
    lines = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    lines[-1].update(phase="scst", train_loss=-0.5)
    (a / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert plot_curves(a / "log.jsonl", a / "curves.png").stat().st_size > 0


def test_a_folder_that_is_not_a_run_is_skipped_with_a_note(tmp_path, caplog):
    a = write_run(tmp_path / "a", [10, 30, 20])
    failed = tmp_path / "failed"  # a command that stopped before its first epoch left its config alone
    failed.mkdir()
    (failed / "config.toml").write_text("[train]\n")
    ens = tmp_path / "ens"  # an ensemble's run directory stands for its members
    ens.mkdir()
    write_run(ens / "member-1", [4, 8])
    write_run(ens / "member-2", [9])
    with caplog.at_level("WARNING", logger="captioner"):
        table = runs_table([a, failed, ens]).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| a", "| ens/member-1", "| ens/member-2"]
    assert caplog.messages == [f"{failed}: skipped (no log.jsonl: not a run directory, or no epoch finished)"]
    with pytest.raises(CaptionerError, match=f"none of {failed} is a run with a finished epoch"):
        runs_table([failed])
