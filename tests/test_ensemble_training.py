"""One command trains an ensemble: members one after another with their own seeds, resumable, scored together,
and a run directory of an ensemble names its members for evaluate, caption and export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.config import load_config
from captioner.errors import CaptionerError
from captioner.model.ensemble import Ensemble
from captioner.train import ensemble as ensemble_training
from captioner.train import loop as training
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_flickr_layout(tmp_path_factory.mktemp("tiny") / "flickr")


def tiny_config(data: Path, cache: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={cache}",
                                                         "train.epochs=2", "model.dropout=0.3", *extra])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_members_differ_by_seed_alone_and_member_1_is_the_plain_run(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "cache", "ensemble.members=2", "train.seed=5")
    report = ensemble_training.fit_ensemble(cfg, tmp_path / "ens")
    plain = training.fit(tiny_config(tiny_data, tmp_path / "cache", "train.seed=5"), tmp_path / "plain")
    members = [tmp_path / "ens" / f"member-{i}" for i in (1, 2)]
    seeds = [load_config(m / "config.toml").train.seed for m in members]
    assert seeds == [5, 6]
    assert all(load_config(m / "config.toml").ensemble.members == 1 for m in members)
    one = checkpoint.load_model(members[0] / "last.pt").model.state_dict()
    two = checkpoint.load_model(members[1] / "last.pt").model.state_dict()
    same = checkpoint.load_model(tmp_path / "plain" / "last.pt").model.state_dict()
    for name in one:
        torch.testing.assert_close(one[name], same[name], msg=name)  # member 1 is the plain run, exactly
    assert any(not torch.equal(one[n], two[n]) for n in one)  # member 2 learned something else
    assert json.loads((members[0] / "log.jsonl").read_text().splitlines()[-1])["epoch"] == plain["epoch"]
    # the report scores each member and the ensemble, greedy on dev
    saved = json.loads((tmp_path / "ens" / ensemble_training.REPORT).read_text())
    assert saved == report
    assert len(saved["members"]) == 2 and set(saved["member_seconds"]) == {"1", "2"}
    assert {"BLEU-4", "CIDEr"} <= set(saved["val_greedy"])


def test_an_interrupted_ensemble_resumes_with_the_member_it_was_training(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path / "cache", "ensemble.members=3")
    calls = []
    real_fit = training.fit

    def fit_then_stop(member_cfg, run_dir, resume=False):
        calls.append((Path(run_dir).name, resume))
        if Path(run_dir).name == "member-2":
            raise KeyboardInterrupt
        return real_fit(member_cfg, run_dir, resume)

    monkeypatch.setattr(ensemble_training, "fit", fit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ensemble_training.fit_ensemble(cfg, tmp_path / "ens")
    assert calls == [("member-1", False), ("member-2", False)]
    assert ensemble_training.is_ensemble_run(tmp_path / "ens")
    with pytest.raises(CaptionerError, match="already holds a run"):
        ensemble_training.fit_ensemble(cfg, tmp_path / "ens")
    monkeypatch.setattr(ensemble_training, "fit", real_fit)
    report = ensemble_training.fit_ensemble(None, tmp_path / "ens", resume=True)
    assert len(report["members"]) == 3
    assert [load_config(tmp_path / "ens" / f"member-{i}" / "config.toml").train.seed for i in (1, 2, 3)] == [0, 1, 2]


def test_the_run_directory_names_its_members_for_evaluate_and_export(tiny_data, tmp_path):
    run = tmp_path / "ens"
    proc = run_cli("train", "--config", "tiny", "--data", tiny_data, "--run-dir", run,
                   "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=2",
                   "--set", "ensemble.members=2", "--set", "train.precision=fp32")
    assert proc.returncode == 0, proc.stderr
    assert "ensemble of 2 members" in proc.stderr
    assert checkpoint.member_checkpoints(run) == [run / "member-1" / "best.pt", run / "member-2" / "best.pt"]
    assert checkpoint.member_checkpoints(tmp_path) == []  # a folder without members names none
    again = run_cli("train", "--resume", run)  # a finished ensemble resumes to nothing new
    assert again.returncode == 0, again.stderr

    proc = run_cli("export", run, tmp_path / "out" / "model.pt")
    assert proc.returncode == 0, proc.stderr
    # each exported member carries the run's neighbour index beside it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-2.knn", "model-2.pt", "model.knn", "model.pt"]
    exported = [checkpoint.load_model(tmp_path / "out" / n) for n in ("model.pt", "model-2.pt")]
    assert all(t.dtype == torch.float16 for t in checkpoint.read(tmp_path / "out" / "model-2.pt")["model"].values())
    ens = checkpoint.ensemble_of(exported, ["model.pt", "model-2.pt"])
    assert isinstance(ens.model, Ensemble) and len(ens.model.members) == 2

    proc = run_cli("evaluate", "--checkpoint", run, "--data", tiny_data, "--split", "val", "--no-meteor",
                   "--cache-dir", tmp_path / "cache", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "CIDEr" in proc.stdout

    (run / "member-2" / "best.pt").unlink()
    proc = run_cli("evaluate", "--checkpoint", run, "--data", tiny_data, "--split", "val", "--no-meteor",
                   "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2 and "member-2" in proc.stderr and "Traceback" not in proc.stderr
