"""`captioner caption` from a user's side: it checks every argument before it loads a model (or imports
torch), counts the photos it cannot read, shows a progress bar on a terminal, writes --output files and
takes --batch-size, and names its precision only under --verbose."""

import csv
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import checkpoint, cli
from captioner.inference import Captioner
from captioner.precision import announce, resolve

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(str(p) for p in (REPO / "examples").glob("*.jpg"))
NO_BF16 = frozenset({"avx2", "fma"})


def caption(*args) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(["caption", *map(str, args)])
    return done.value.code


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(checkpoint, "load_model", refuse)
    monkeypatch.setattr(checkpoint, "read", refuse)
    monkeypatch.setattr(Captioner, "from_checkpoints", refuse)


@pytest.mark.parametrize("args,code,message", [
    (["nothere.jpg"], 1, "error: nothere.jpg: no such file"),
    (["examples/street.jpg", "--checkpoint", "nosuch"], 2, "error: nosuch: neither a checkpoint file nor a shipped"),
    (["examples/street.jpg", "--checkpoint", "missing.pt"], 2, "error: missing.pt: checkpoint not found"),
    (["examples/street.jpg", "--batch-size", "0"], 2, "error: --batch-size must be at least 1, got 0"),
    (["examples/street.jpg", "--max-len", "0"], 2, "error: --max-len must be at least 1, got 0"),
    (["examples/street.jpg", "--length-penalty", "-1"], 2, "error: --length-penalty must be 0"),
    (["examples/street.jpg", "--output", "captions.txt"], 2, "error: captions.txt: --output writes JSON lines"),
    (["examples/street.jpg", "--output", "nofolder/c.csv"], 2, "error: nofolder: no such folder for the --output"),
    (["examples/street.jpg", "--html", "nofolder/c.html"], 2, "error: nofolder: no such folder for the gallery"),
])
def test_arguments_are_checked_before_any_model_loads(no_model, capsys, monkeypatch, args, code, message):
    monkeypatch.chdir(REPO)
    assert caption(*args) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_a_missing_photo_answers_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom captioner.cli import main\n"
            "try:\n    main(['caption', sys.argv[1]])\nexcept SystemExit as done:\n"
            "    print(done.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nothere.jpg")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["1", "False"], done.stderr
    assert done.stderr == f"error: {tmp_path / 'nothere.jpg'}: no such file or directory\n"


def test_output_files_batch_size_and_the_note_on_formats_it_cannot_read(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in EXAMPLES:
        shutil.copy(path, photos)
    for name in ("IMG_1.heic", "IMG_2.HEIC", "clip.mov", "notes.txt", ".DS_Store"):
        (photos / name).write_bytes(b"not read")

    assert caption(photos, "--checkpoint", "flickr8k", "--output", tmp_path / "c.jsonl", "--batch-size", "2") == 0
    out, err = capsys.readouterr()
    printed = dict(line.split("\t") for line in out.splitlines())
    assert len(printed) == len(EXAMPLES)
    notes = [line for line in err.splitlines() if line.startswith("note: skipped")]
    assert notes == ["note: skipped 3 files in a format this does not read (2 .heic, 1 .mov); it reads .bmp .gif "
                     ".jpeg .jpg .png .tif .tiff .webp: convert them to one of those to caption them"]
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert {r["path"]: r["caption"] for r in rows} == printed
    assert all(r["n_best"][0]["caption"] == r["caption"] for r in rows)

    # CSV by the suffix, with the n-best; the same captions at another batch size
    assert caption(photos, "--checkpoint", "flickr8k", "--output", tmp_path / "c.csv", "--n-best", "2",
                   "--batch-size", "1") == 0
    capsys.readouterr()
    with open(tmp_path / "c.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "rank", "caption", "score"] and len(table) == 2 * len(EXAMPLES)
    assert {r["path"]: r["caption"] for r in table if r["rank"] == "1"} == printed
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed whole


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_on_a_terminal_and_none_elsewhere(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert caption(*EXAMPLES, "--checkpoint", "flickr8k") == 0
    bar = terminal.getvalue()
    assert "captioning" in bar and f"{len(EXAMPLES)}/{len(EXAMPLES)}" in bar
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == EXAMPLES  # the captions themselves stay clean
    monkeypatch.undo()
    assert caption(*EXAMPLES, "--checkpoint", "flickr8k") == 0  # stderr not a terminal: no bar
    assert capsys.readouterr().err == ""


def test_the_precision_line_only_under_verbose(caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="captioner")
    assert caption(EXAMPLES[0], "--checkpoint", "flickr8k") == 0
    [record] = [r for r in caplog.records if r.getMessage().startswith("precision:")]
    assert record.levelno == logging.DEBUG  # shown with -v only (setup_logging: INFO without it)
    assert record.getMessage().startswith("precision: fp32 on cpu (") or "bf16" in record.getMessage()
    # training says it always; bf16 asked for where it is emulated is a warning anywhere
    caplog.clear()
    announce(resolve("fp32", "cpu"))
    announce(resolve("bf16", "cpu", flags=NO_BF16), verbose_only=True)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
