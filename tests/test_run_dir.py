"""The run directory of `captioner train`: one run at a time (a lock naming its holder), the dataset checked
before the run directory, --overwrite that removes the run's own files and nothing else, and a last line
that names the best checkpoint and the command to run next."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from captioner import cli
from captioner.commands import train as train_command
from captioner.errors import CaptionerError
from captioner.train.run_dir import HOLDER_FILE, RunLock, remove_run, run_files
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_flickr_layout(tmp_path_factory.mktemp("tiny") / "flickr")


def run_cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def train_here(capsys, *args) -> tuple[int, str]:
    """`captioner train ARGS` in this process (no interpreter to start): -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", *map(str, args)], entry=False)
    return exit.value.code, capsys.readouterr().err


def fake_run(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.toml", *names):
        (folder / name).write_text(f"{name} of a run\n")
    return folder


def test_a_second_holder_is_refused_with_who_holds_it(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert f'"pid": {os.getpid()}' in (run / HOLDER_FILE).read_text()
        with pytest.raises(CaptionerError, match=rf"run: another training run is using it \(pid {os.getpid()} on "):
            with RunLock(run):
                pass
    assert not (run / HOLDER_FILE).exists()
    with RunLock(run):  # released: taken again
        pass


def test_a_second_train_into_a_running_runs_directory_stops_in_one_line(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):  # as a run in progress holds it
        code, stderr = train_here(capsys, "--config", "tiny", "--data", tiny_data, "--run-dir", run,
                                  "--set", f"data.cache_dir={tmp_path / 'cache'}")
    [line] = error_lines(stderr)
    assert code == 2 and "Traceback" not in stderr
    assert f"another training run is using it (pid {os.getpid()} on " in line and ", started " in line
    assert not (run / "config.toml").exists() and not (tmp_path / "cache").exists()  # it did nothing


@pytest.mark.slow
def test_the_lock_holds_across_processes_and_a_killed_holder_releases_it(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from captioner.train.run_dir import RunLock
        with RunLock({str(run)!r}):
            print("holding", flush=True)
            sys.stdin.read()
        """)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(CaptionerError, match=f"another training run is using it \\(pid {holder.pid} on "):
            with RunLock(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the operating system drops the lock
        holder.wait(timeout=60)
    with RunLock(run):
        assert f'"pid": {os.getpid()}' in (run / HOLDER_FILE).read_text()


def test_the_dataset_is_checked_before_the_run_directory(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "last.pt", "log.jsonl")
    code, stderr = train_here(capsys, "--config", "tiny", "--data", tmp_path / "nothere", "--run-dir", run)
    [line] = error_lines(stderr)
    assert code == 2 and "nothere: dataset folder does not exist" in line, stderr


def test_a_run_is_kept_unless_overwrite_and_then_only_its_files_go(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="captioner")
    run = fake_run(tmp_path / "run", "log.jsonl", "curves.png", "best.pt", "last.pt")
    fake_run(run / "member-1", "best.pt")
    (run / "notes.txt").write_text("my notes")
    (run / "member-1" / "eval.json").write_text("{}")
    with pytest.raises(CaptionerError, match=r"run already holds a run \(config.toml, log.jsonl, curves.png, "
                                             r"best.pt, last.pt, and 1 members' folders\); --resume .* continues "
                                             r"it, --overwrite deletes those files"):
        train_command._make_room(run, overwrite=False)
    assert len(run_files(run)) == 7
    train_command._make_room(run, overwrite=True)
    assert "--overwrite: removed the run in" in caplog.text
    assert sorted(os.listdir(run)) == ["member-1", "notes.txt"] and os.listdir(run / "member-1") == ["eval.json"]


def test_a_folder_that_is_not_a_run_directory_loses_nothing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("best.pt", "log.jsonl", "a.jpg"):  # no config.toml: not a run, whatever the names
        (folder / name).write_text("mine")
    assert run_files(folder) == [] and remove_run(folder) == []
    train_command._make_room(folder, overwrite=True)
    assert sorted(os.listdir(folder)) == ["a.jpg", "best.pt", "log.jsonl"]


def test_a_config_left_by_a_run_that_never_finished_an_epoch_is_no_obstacle(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="captioner")
    run = fake_run(tmp_path / "run")
    train_command._make_room(run, overwrite=False)
    assert "never finished an epoch" in caplog.text and os.listdir(run) == []


@pytest.mark.slow
def test_train_ends_naming_the_best_checkpoint_and_the_next_command(tiny_data, tmp_path):
    run = tmp_path / "my run"
    args = ["train", "--config", "tiny", "--data", tiny_data, "--run-dir", run, "--set",
            f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=1", "--set", "train.precision=fp32"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == (f"best checkpoint: {run / 'best.pt'}; caption photos with it: "
                    f"captioner caption --checkpoint '{run / 'best.pt'}' PHOTO...")
    (run / "notes.txt").write_text("mine")
    again = run_cli(*args)
    assert again.returncode == 2 and "--overwrite" in error_lines(again.stderr)[0]
    again = run_cli(*args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert "--overwrite: removed the run in" in again.stderr and (run / "notes.txt").read_text() == "mine"
    resumed = run_cli("train", "--resume", run)  # nothing left to train: it says where the model is
    assert resumed.returncode == 0 and "captioner caption --checkpoint" in resumed.stdout, resumed.stderr
