"""The shipped models' registry (captioner.pretrained): one entry per model with its metadata, the names
that checkpoint arguments resolve through, `captioner models`, `captioner.list_pretrained()`, and the one
readable line that names a model in a page header."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import captioner
from captioner import checkpoint, cli, pretrained
from captioner.errors import CaptionerError
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_model_is_an_entry_with_its_metadata():
    names = captioner.list_pretrained()
    assert names == ["flickr8k", "flickr8k-2", "flickr8k-3", "flickr8k-ensemble"]
    assert captioner.list_pretrained("flickr8k-*") == ["flickr8k-2", "flickr8k-3", "flickr8k-ensemble"]
    shipped = {p.stem for p in pretrained.FOLDER.glob("*.pt")}
    singles = {n for n in names if not captioner.get_pretrained(n).ensemble}
    assert singles == shipped  # every file has an entry, every single entry a file
    for name in names:
        model = captioner.get_pretrained(name)
        assert model.name == name and model.encoder.startswith("efficientnet_lite0")
        assert model.train_command.startswith("captioner train --config flickr8k")
        assert "research" in model.licence and model.size_bytes() > 5e6
        assert [p.name for p in model.files()] == [f"{m}.pt" for m in model.members]
    default = captioner.get_pretrained(pretrained.DEFAULT)
    assert default.ensemble and dict(default.dev_scores)["CIDEr"] == 58.3
    with pytest.raises(CaptionerError, match=r"^nosuch: not a shipped model's name \(shipped: flickr8k, "):
        captioner.get_pretrained("nosuch")


def test_checkpoint_names_resolve_through_the_registry():
    assert checkpoint.SINGLE_MODEL == pretrained.SINGLE == "flickr8k"
    assert checkpoint.DEFAULT_MODELS == captioner.get_pretrained(pretrained.DEFAULT).members
    assert checkpoint.default_checkpoints() == checkpoint.pretrained_paths([]) \
        == checkpoint.pretrained_paths(["flickr8k-ensemble"])
    assert checkpoint.pretrained_paths(["flickr8k-2", "flickr8k"]) == [pretrained.FOLDER / "flickr8k-2.pt",
                                                                        pretrained.FOLDER / "flickr8k.pt"]
    with pytest.raises(CaptionerError, match="flickr8k-ensemble: the shipped ensemble of .*; this takes one model"):
        checkpoint.pretrained_path("flickr8k-ensemble")  # where one decoder is needed (analyze, --init-from)
    with pytest.raises(CaptionerError, match=r"neither a checkpoint file nor a shipped model's name \(shipped: "
                                             r"flickr8k, flickr8k-2, flickr8k-3, flickr8k-ensemble\)"):
        checkpoint.pretrained_paths(["nosuch"])


def test_the_registry_imports_no_torch():
    code = "import sys, captioner; captioner.list_pretrained(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_the_models_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["models"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in captioner.list_pretrained():
        assert f"\n{name}" in f"\n{out}"
    assert "flickr8k-ensemble (default)" in out and "members  flickr8k, flickr8k-2, flickr8k-3" in out
    assert "CIDEr 58.3" in out and "33.1 MB" in out and "captioner train --config flickr8k-ensemble" in out
    with pytest.raises(SystemExit):
        cli.main(["models", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == captioner.list_pretrained()
    assert [m["name"] for m in listed if m["default"]] == ["flickr8k-ensemble"]


def test_a_model_is_named_in_one_readable_line():
    assert pretrained.describe([]) == "the shipped ensemble (flickr8k, flickr8k-2, flickr8k-3)"
    assert pretrained.describe(["flickr8k-ensemble"]) == pretrained.describe([])
    assert pretrained.describe(["runs/a/best.pt"]) == "runs/a/best.pt"
    assert pretrained.describe(["a.pt", "b.pt", "c.pt"]) == "the ensemble of a.pt, b.pt and c.pt"


def test_the_evaluate_page_header_is_a_readable_line(tmp_path, capsys):
    data = make_flickr_layout(tmp_path / "flickr", per_colour=1)
    page = tmp_path / "val.html"
    with pytest.raises(SystemExit) as done:
        cli.main(["evaluate", "--data", str(data), "--split", "val", "--no-meteor", "--cache-dir",
                  str(tmp_path / "cache"), "--html", str(page)])
    assert done.value.code == 0, capsys.readouterr().err
    text = page.read_text()
    assert "the shipped ensemble (flickr8k, flickr8k-2, flickr8k-3), beam 3:" in text
    assert "[&#x27;" not in text and "['" not in text
