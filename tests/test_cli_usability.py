"""What a new user meets at the command line: evaluate's default split, --n-best without --json, every
option's default in its help, the serve extra's hint, progress bars off where stderr is no terminal."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.cli import _Formatter, build_parser
from captioner.commands.evaluate import pick_split
from captioner.errors import CaptionerError

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=timeout)


# ---- evaluate's split ------------------------------------------------------------------------------------

def test_default_split_is_test_when_present(caplog):
    assert pick_split(None, {"train", "val", "test"}, "data") == "test"
    assert not caplog.records


def test_default_split_falls_back_to_val_with_a_note(caplog):
    with caplog.at_level("INFO", logger="captioner"):
        assert pick_split(None, {"train", "val"}, "data/flickr8k") == "val"
    [note] = [r.getMessage() for r in caplog.records]
    assert "no test split" in note and "scoring val" in note and "data/flickr8k" in note


def test_an_absent_split_names_the_splits_present():
    with pytest.raises(CaptionerError, match=r"data: no test split \(the data has: train, val\)"):
        pick_split("test", {"val", "train"}, "data")
    assert pick_split("dev", {"train", "val"}, "data") == "val"  # spellings still work
    with pytest.raises(CaptionerError, match=r"neither a test nor a val split.*the data has: train"):
        pick_split(None, {"train"}, "data")


@pytest.mark.realdata
def test_evaluate_on_data_without_test_or_val_says_what_it_has(coco_mini_root):
    proc = run_cli("evaluate", "--data", coco_mini_root, "--no-meteor")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "the data has: train" in proc.stderr
    proc = run_cli("evaluate", "--data", coco_mini_root, "--split", "test")
    assert proc.returncode == 2 and "no test split (the data has: train)" in proc.stderr


@pytest.mark.realdata
def test_evaluate_default_split_and_html_gallery_on_flickr8k(flickr8k_root, tmp_path):
    """No --split: flickr8k here has no test split, so val is scored (and the note says so); --html
    writes a page with every scored image, worst CIDEr first, matching the --json scores."""
    page, report = tmp_path / "val.html", tmp_path / "val.json"
    proc = run_cli("evaluate", "--data", flickr8k_root, "--limit", "12", "--no-meteor", "--device", "cpu",
                   "--cache-dir", tmp_path / "cache", "--json", report, "--html", page)
    assert proc.returncode == 0, proc.stderr
    assert "no test split" in proc.stderr and "scoring val" in proc.stderr
    data = json.loads(report.read_text())
    assert data["split"] == "val" and data["images"] == 12
    html = page.read_text()
    ciders = [float(x) for x in re.findall(r'data-cider="([\d.]+)"', html)]
    assert len(ciders) == 12 and len(list((tmp_path / "val_files").glob("*.jpg"))) == 12
    want = sorted(round(x["scores"]["CIDEr"], 4) for x in data["per_image"])
    assert sorted(ciders) == pytest.approx(want, abs=1e-3)
    for item in data["per_image"]:
        assert item["caption"] in html and item["references"][0].replace("&", "&amp;").split()[0] in html
    assert f'{data["totals"]["CIDEr"]:.2f}' in html


def test_evaluate_refuses_a_bad_html_path_before_any_work(tmp_path):
    proc = run_cli("evaluate", "--data", tmp_path, "--html", tmp_path / "page.txt")
    assert proc.returncode == 2 and "HTML page" in proc.stderr


# ---- caption's --n-best ----------------------------------------------------------------------------------

def test_n_best_without_json_prints_each_hypothesis():
    proc = run_cli("caption", "examples/skateboarder.jpg", "--n-best", "3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 3 and all(len(r) == 3 for r in rows)
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    plain = run_cli("caption", "examples/skateboarder.jpg")
    assert plain.stdout.strip().split("\t")[1] == rows[0][2]  # the best of the n-best is the caption


# ---- help ------------------------------------------------------------------------------------------------

def all_actions(parser, name="captioner"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_actions(sub, f"{name} {sub_name}")
        else:
            yield name, action


def test_every_option_shows_its_default_in_help():
    missing = []
    for command, action in all_actions(build_parser()):
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        text = _Formatter("x")._get_help_string(action)
        if not text or "(default" not in text:
            missing.append(f"{command} {action.option_strings[0]}")
    assert missing == []


def test_help_of_serve_and_device_options():
    proc = run_cli("serve", "--help", timeout=60)
    assert proc.returncode == 0
    for option in ("--host", "--port", "--checkpoint", "--device", "--max-batch", "--max-wait-ms", "--max-upload-mb"):
        assert option in proc.stdout
    assert "(default: 127.0.0.1)" in proc.stdout and "(default: 8000)" in proc.stdout
    for command in ("caption", "evaluate"):
        assert "--device {auto,cpu,cuda}" in run_cli(command, "--help", timeout=60).stdout


def test_serve_without_its_extra_is_a_one_line_hint(monkeypatch):
    from captioner.commands import serve

    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    args = build_parser().parse_args(["serve"])
    with pytest.raises(CaptionerError, match=r"serving needs uvicorn: pip install 'captioner\[serve\]'"):
        serve.run(args)


# ---- progress bars ---------------------------------------------------------------------------------------

def test_no_progress_bar_where_stderr_is_not_a_terminal(tmp_path, capsys):
    from captioner.vision.encoders import build_encoder
    from captioner.vision.features import extract_features

    photos = sorted((REPO / "examples").glob("*.jpg"))
    store = extract_features(build_encoder(), photos, tmp_path / "cache", num_workers=0)
    assert all(p in store for p in photos)
    err = capsys.readouterr().err
    assert "features (" not in err and "img/s" not in err, err
