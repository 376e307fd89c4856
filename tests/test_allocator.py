"""The allocator the `captioner` command picks for itself: a user's own setting wins, the opt-out, a
missing library, at most one re-execution, only from the process's own entry; and the command still
works (output, exit status) when it re-executes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import allocator
from captioner.allocator import CHOICE, GLIBC_TUNED, MARKER, decide, describe, entry_argv

REPO = Path(__file__).resolve().parents[1]
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TUNED = {"GLIBC_TUNABLES": GLIBC_TUNED, MARKER: "glibc-tuned"}
JEM = {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": allocator.JEMALLOC_TUNED, MARKER: "jemalloc"}


def test_auto_is_the_measured_choice():
    expected = JEM if allocator.AUTO == "jemalloc" else TUNED
    assert decide({}, jemalloc=JEMALLOC) == expected
    assert decide({CHOICE: "auto"}, jemalloc=JEMALLOC) == expected
    assert decide({}, jemalloc=None) == TUNED  # no library: the tunables, which need no install


def test_explicit_choices():
    assert decide({CHOICE: "jemalloc"}, jemalloc=JEMALLOC) == JEM
    assert decide({CHOICE: "jemalloc"}, jemalloc=None) == TUNED  # absent: fall back, never a broken preload
    assert decide({CHOICE: "glibc-tuned"}, jemalloc=JEMALLOC) == TUNED
    assert decide({CHOICE: " Glibc-Tuned "}, jemalloc=JEMALLOC) == TUNED


@pytest.mark.parametrize("env", [{CHOICE: "system"}, {CHOICE: "nonsense"},
                                 {"LD_PRELOAD": "/opt/libmine.so"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                 {"MALLOC_CONF": "narenas:1"}, {"LD_PRELOAD": "/x.so", CHOICE: "jemalloc"}])
def test_the_users_setting_and_the_opt_out_win(env):
    assert decide(env, jemalloc=JEMALLOC) is None


def test_at_most_once_and_only_on_glibc():
    assert decide({MARKER: "glibc-tuned", "GLIBC_TUNABLES": GLIBC_TUNED}, jemalloc=JEMALLOC) is None
    assert decide({MARKER: "jemalloc"}, jemalloc=JEMALLOC) is None
    assert decide({}, jemalloc=JEMALLOC, glibc=False) is None


def test_entry_argv_runs_the_same_command_again():
    py = "/venv/bin/python"
    # the console script
    assert entry_argv(["/venv/bin/captioner", "train", "-x"], ["python3", "/venv/bin/captioner", "train", "-x"],
                      py) == [py, "/venv/bin/captioner", "train", "-x"]
    # python -u -m captioner ...
    assert entry_argv(["/src/captioner/__main__.py", "caption", "a.jpg"],
                      ["python3", "-u", "-m", "captioner", "caption", "a.jpg"], py) == \
        [py, "-u", "-m", "captioner", "caption", "a.jpg"]
    assert entry_argv(["/src/captioner/__main__.py"], ["python3", "-mcaptioner"], py) == [py, "-mcaptioner"]
    # the train.py wrapper, as torchrun starts it
    assert entry_argv(["train.py", "--config", "tiny"], ["/usr/bin/python3", "-u", "train.py", "--config", "tiny"],
                      py) == [py, "-u", "train.py", "--config", "tiny"]


def test_entry_argv_refuses_what_is_not_the_processs_own_command_line():
    py = "/venv/bin/python"
    # a test that replaced sys.argv and called the entry
    assert entry_argv(["captioner", "caption", "a.jpg"], ["python3", "-m", "pytest", "-q"], py) is None
    assert entry_argv(["captioner"], ["python3", "-m", "pytest"], py) is None
    assert entry_argv(["-c"], ["python3", "-c", "import captioner"], py) is None
    assert entry_argv(["captioner"], [], py) is None
    assert entry_argv(["captioner"], ["python3", "captioner"], "") is None


def test_describe_names_the_allocator_and_who_chose_it(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert describe({MARKER: "jemalloc"}, str(maps)) == "jemalloc (LD_PRELOAD, set by captioner)"
    assert describe({}, str(maps)) == "jemalloc (user's LD_PRELOAD)"
    plain = tmp_path / "plain"
    plain.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert describe(TUNED, str(plain)) == "glibc (GLIBC_TUNABLES, set by captioner)"
    assert describe({"GLIBC_TUNABLES": "x"}, str(plain)) == "glibc (user's GLIBC_TUNABLES)"
    if allocator._glibc():
        assert describe({}, str(plain)) == "glibc (default)"
        assert "none of" in describe({CHOICE: "fast"}, str(plain))


def test_a_library_call_of_main_never_reexecutes(monkeypatch):
    from captioner import cli

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed from a library call"))
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (*allocator.USER_VARS, MARKER, CHOICE)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "captioner", *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(**env), timeout=120)


def _allocator_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("allocator: "))


@pytest.mark.skipif(not allocator._glibc(), reason="the allocator is chosen on Linux with glibc only")
def test_the_command_reexecutes_once_with_the_chosen_allocator(tmp_path):
    # --help through the re-execution: output and exit status as ever
    done = _cli("--help")
    assert done.returncode == 0 and "caption" in done.stdout
    # a cheap training command that fails: its exit status and error survive the re-execution, and -v logs
    # the allocator
    missing = str(tmp_path / "missing.toml")
    done = _cli("-v", "train", "--config", missing)
    assert done.returncode == 2 and "error:" in done.stderr
    jemalloc = allocator.AUTO == "jemalloc" and allocator.jemalloc_path()
    expected = "jemalloc (LD_PRELOAD" if jemalloc else "glibc (GLIBC_TUNABLES"
    assert _allocator_line(done.stderr) == f"allocator: {expected}, set by captioner)"
    # a user's own setting is left alone, and the opt-out runs the process as started
    done = _cli("-v", "train", "--config", missing, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert _allocator_line(done.stderr) == "allocator: glibc (user's GLIBC_TUNABLES)"
    done = _cli("-v", "train", "--config", missing, **{CHOICE: "system"})
    assert _allocator_line(done.stderr) == "allocator: glibc (default)"


@pytest.mark.skipif(not allocator._glibc(), reason="the allocator is chosen on Linux with glibc only")
def test_commands_that_do_not_train_start_once(tmp_path, monkeypatch):
    # the allocator helps training's large tensors only: a caption or an export is not worth a second start
    for args in (["export", str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")],
                 ["caption", str(tmp_path / "nothere.jpg")]):
        done = _cli("-v", *args)
        assert done.returncode in (1, 2) and "error:" in done.stderr
        assert _allocator_line(done.stderr) == "allocator: glibc (default)"
    from captioner import cli

    calls = []
    monkeypatch.setattr(allocator, "reexec", lambda *a: calls.append(a))
    with pytest.raises(SystemExit):
        cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")], entry=True)
    assert calls == []
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(tmp_path / "missing.toml")], entry=True)
    assert len(calls) == 1


@pytest.mark.skipif(not allocator._glibc(), reason="the allocator is chosen on Linux with glibc only")
def test_the_wrapper_scripts_reexecute_with_stdin_and_exit_status(tmp_path):
    script = tmp_path / "probe.py"  # a wrapper like train.py, which prints what it runs with
    script.write_text("import os, sys\n"
                      "from captioner import allocator\n"
                      "allocator.reexec()\n"
                      "print(allocator.describe(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], "
                      "sys.stdin.read().strip())\n"
                      "sys.exit(7)\n")
    done = subprocess.run([sys.executable, str(script), "a", "b c"], input="from stdin", capture_output=True,
                          text=True, env=_env(**{CHOICE: "glibc-tuned"}), timeout=60)
    assert done.returncode == 7
    assert done.stdout.strip() == f"glibc (GLIBC_TUNABLES, set by captioner) {GLIBC_TUNED} ['a', 'b c'] from stdin"
