"""Interruption: training killed at random moments resumes to exactly the weights of an uninterrupted run.

train.py is killed with SIGKILL (no cleanup handlers run) several times, each time resumed with
`train.py --resume RUN_DIR`, until it completes. After every kill the run directory must still hold a
loadable last.pt whenever it held one before, and the final weights must equal those of a run that was
never interrupted. The kill moments are random but seeded: the first lands before the first checkpoint
(reading the data, extracting features, epoch 1: the resume then starts afresh from the run's
config.toml), the others a random delay after a random number of further epochs, so they hit training
steps, evaluation and checkpoint writes alike.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.train import loop as training
from captioner.train import step as train_step
from captioner.config import load_config, to_dict, to_toml
from captioner.errors import CaptionerError
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 10
KILLS = 5


def logged_epochs(run_dir: Path) -> list[int]:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return []
    # The last line may be cut short by a kill mid-write.
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines() if line.endswith("}")]


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s")
        time.sleep(0.02)


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(tmp_path):
    data = make_flickr_layout(tmp_path / "flickr")
    overrides = [f"data.root={data}", f"train.epochs={EPOCHS}"]
    full = training.fit(load_config(REPO / "configs" / "tiny.toml", overrides + [f"data.cache_dir={tmp_path / 'c1'}"]),
                        tmp_path / "full")
    assert full["epoch"] == EPOCHS

    run = tmp_path / "killed"
    first = ["--config", "configs/tiny.toml", "--run-dir", str(run)]
    first += [arg for item in overrides + [f"data.cache_dir={tmp_path / 'c2'}"] for arg in ("--set", item)]
    rng = random.Random(6)
    kills, starts = [], 0
    while True:
        # Killed before it wrote its config, the run has nothing to resume: the user runs the command again.
        args = ["--resume", str(run)] if (run / "config.toml").is_file() else first
        with (tmp_path / f"stderr{starts}.txt").open("w") as err:
            proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=err)
        starts += 1
        if len(kills) == KILLS:
            assert proc.wait(timeout=300) == 0, (tmp_path / f"stderr{starts - 1}.txt").read_text()[-3000:]
            break
        try:
            if not kills:  # before the first checkpoint: reading the data, extracting features, epoch 1
                wait_until(lambda: proc.poll() is not None or (run / "config.toml").is_file(), timeout=300)
                time.sleep(rng.uniform(0.0, 1.5))
            else:
                target = len(logged_epochs(run)) + rng.randint(1, 2)
                wait_until(lambda: proc.poll() is not None or len(logged_epochs(run)) >= target, timeout=300)
                time.sleep(rng.uniform(0.0, 0.4))  # anywhere in the next epoch: a step, evaluation, a save
            had_checkpoint = (run / "last.pt").is_file()
            assert proc.poll() is None, "the run finished before it could be killed; raise EPOCHS"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        kills.append(max(logged_epochs(run), default=0))
        if had_checkpoint:
            assert (run / "last.pt").is_file()
        if (run / "last.pt").is_file():
            checkpoint.read(run / "last.pt", training=True)  # loadable, whatever the kill interrupted
    assert len(kills) == KILLS and starts == KILLS + 1 and kills[-1] < EPOCHS

    a = checkpoint.read(tmp_path / "full" / "last.pt", training=True)
    b = checkpoint.read(run / "last.pt", training=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-6)
    assert logged_epochs(run)[-1] == EPOCHS
    # A killed save leaves at most one hidden temporary file per checkpoint name, never read as a checkpoint.
    leftovers = {name for name in os.listdir(run) if name.endswith(".tmp")}
    assert all(name.startswith(".best.pt.") for name in leftovers), leftovers
    assert {"config.toml", "log.jsonl", "last.pt", "best.pt"} <= set(os.listdir(run))


@pytest.mark.parametrize("value,bad_call,step,good", [
    (float("nan"), 8, 7, "last.pt"),  # in epoch 2: epoch 1's checkpoint is the last good one
    (float("inf"), 3, 2, None),  # in epoch 1: no checkpoint yet
])
def test_non_finite_loss_names_step_and_last_good_checkpoint(tmp_path, monkeypatch, value, bad_call, step, good):
    data = make_flickr_layout(tmp_path / "flickr")
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={tmp_path / 'c'}"])
    real, calls = train_step.backward_batch, []

    def blows_up(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return torch.tensor(value) if len(calls) == bad_call else loss

    monkeypatch.setattr(train_step, "backward_batch", blows_up)
    run = tmp_path / "run"
    with pytest.raises(CaptionerError) as info:
        training.fit(cfg, run)
    message = str(info.value)
    assert f"loss became {value} at step {step}" in message
    if good:
        assert f"last good checkpoint: {run / good}" in message
        assert checkpoint.read(run / good, training=True)["step"] == 5  # the end of epoch 1, intact
    else:
        assert "last good checkpoint: none" in message and not (run / "last.pt").exists()


def test_resume_before_the_first_checkpoint_starts_afresh_from_config_toml(tmp_path):
    with pytest.raises(CaptionerError, match="nothing to resume"):
        training.fit(None, tmp_path / "never started", resume=True)
    data = make_flickr_layout(tmp_path / "flickr")
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={tmp_path / 'c'}",
                                                       "train.epochs=1"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))  # as a run killed before its first epoch ended leaves it
    assert training.fit(None, run, resume=True)["epoch"] == 1
    assert checkpoint.read(run / "last.pt", training=True)["config"] == to_dict(cfg)
