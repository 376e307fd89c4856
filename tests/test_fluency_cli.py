"""`evaluate` reports the fluency counts (and writes them to --json); the decode guards reach it from the
command line, on by default: with them the shipped model neither stutters nor dangles."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.eval.fluency import fluency_counts
from captioner.eval.hallucination import object_hallucination

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.realdata
@pytest.mark.slow
def test_evaluate_prints_and_writes_fluency_and_the_levers_work(coco_mini_root, tmp_path):
    reports = {}
    for name, levers in (("plain", ["--no-repeat-ngram", "0", "--no-repeat-guard", "--no-end-guard"]),
                         ("levers", ["--no-repeat-ngram", "3", "--repeat-guard", "--end-guard"]),
                         ("default", [])):
        out = tmp_path / f"{name}.json"
        proc = run_cli("evaluate.py", "--data", coco_mini_root, "--split", "train", "--limit", "40", "--no-meteor",
                       "--cache-dir", tmp_path / "cache", "--json", out, *levers)
        assert proc.returncode == 0, proc.stderr
        assert "fluency: bad endings" in proc.stdout and "distinct captions / images" in proc.stdout
        report = reports[name] = json.loads(out.read_text())
        assert report["fluency"] == fluency_counts(e["caption"] for e in report["per_image"])
        assert report["fluency"]["images"] == 40
        assert "CHAIR-i" in proc.stdout and "CHAIR-s" in proc.stdout
        again = object_hallucination({e["image"]: e["caption"] for e in report["per_image"]},
                                     {e["image"]: e["references"] for e in report["per_image"]})
        assert report["hallucination"]["chair_s"] == again["chair_s"] and report["hallucination"]["mentions"] > 0
        assert [e["hallucinated"] for e in report["per_image"]] == [again["per_image"][e["image"]]
                                                                      for e in report["per_image"]]
    for name, report in reports.items():
        print(f"\n{name}: {report['fluency']}")
    levers, plain = reports["levers"], reports["plain"]
    assert levers["no_repeat_ngram"] == 3 and levers["end_guard"] is True and levers["repeat_guard"] is True
    assert plain["no_repeat_ngram"] == 0 and plain["end_guard"] is False and plain["repeat_guard"] is False
    default = reports["default"]
    assert default["no_repeat_ngram"] == 2 and default["end_guard"] is True and default["repeat_guard"] is True
    for name in ("levers", "default"):
        assert reports[name]["fluency"]["repeats"] == 0
        # Captions that stop before max_len cannot end badly under the guard.
        ended = [e["caption"] for e in reports[name]["per_image"] if len(e["caption"].split()) < 20]
        assert fluency_counts(ended)["bad_endings"] == 0
