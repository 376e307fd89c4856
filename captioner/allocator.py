"""Which memory allocator the process runs with, and the one the `captioner` command picks for itself.

Training allocates several fresh (tokens x vocabulary) fp32 tensors per step, ~25 MB each at Flickr8k
sizes. glibc's malloc serves blocks that large with mmap and gives them back to the kernel on free, so
each one is page-faulted in again, which on a VM can cost more than the arithmetic on it. The allocator
is chosen before the process starts (GLIBC_TUNABLES is read at startup, a preloaded library must be
loaded first), so `captioner train` re-executes itself once with the environment set (the commands that
do not train start once, see COMMANDS):

    CAPTIONER_ALLOCATOR=auto          (default) the measured best that is present, see AUTO
    CAPTIONER_ALLOCATOR=system        leave the process as it was started
    CAPTIONER_ALLOCATOR=glibc-tuned   GLIBC_TUNABLES that keep large blocks in the heap
    CAPTIONER_ALLOCATOR=jemalloc      LD_PRELOAD=libjemalloc.so.2 with MALLOC_CONF=JEMALLOC_TUNED
                                      (glibc-tuned where the library is absent)

A user's own LD_PRELOAD, GLIBC_TUNABLES or MALLOC_CONF always wins: nothing is changed then. The
re-execution happens at most once (MARKER), only from the process's own entry point (never from a
library call of captioner.cli.main), and only on Linux with glibc. docs/precision.md has the numbers
(benchmarks/allocator.py measures them).

This module imports nothing from the package and no torch, so the command's entry can use it first.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence

CHOICE = "CAPTIONER_ALLOCATOR"
CHOICES = ("auto", "system", "glibc-tuned", "jemalloc")
MARKER = "_CAPTIONER_ALLOCATOR_SET"  # set on the re-executed process: what captioner chose, never twice
USER_VARS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")

# Blocks up to 1 GiB come from the heap, and the heap is given back only when 4 GiB of it are free.
GLIBC_TUNED = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# jemalloc 5 gives freed blocks of 8 MiB and more back at once (its oversize arena) and others after
# 10 s; as it comes, it faults more than glibc. This keeps them, as GLIBC_TUNED does.
JEMALLOC_TUNED = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
AUTO = "glibc-tuned"  # what `auto` means: the measured winner (docs/precision.md, "Memory allocator")
# The commands that re-execute: only training allocates the large tensors this is for. The others (caption,
# evaluate, serve, ...) start once, saving a second interpreter start on every cold caption.
COMMANDS = frozenset({"train"})


def jemalloc_path(exists: Callable[[str], bool] = os.path.isfile) -> str | None:
    return next((p for p in JEMALLOC_PATHS if exists(p)), None)


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def decide(environ: Mapping[str, str], jemalloc: str | None = None, glibc: bool = True) -> dict[str, str] | None:
    """The environment variables to re-execute with, or None to run as started.

    `jemalloc` is the library's path where it is installed, `glibc` whether the C library is glibc.
    """
    if environ.get(MARKER) or not glibc or any(environ.get(v) for v in USER_VARS):
        return None
    choice = environ.get(CHOICE, "auto").strip().lower() or "auto"
    if choice == "system" or choice not in CHOICES:  # an unknown value changes nothing (the log says so)
        return None
    if choice == "auto":
        choice = AUTO
    if choice == "jemalloc" and jemalloc:
        return {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_TUNED, MARKER: "jemalloc"}
    return {"GLIBC_TUNABLES": GLIBC_TUNED, MARKER: "glibc-tuned"}


def entry_argv(argv: Sequence[str], orig_argv: Sequence[str], executable: str) -> list[str] | None:
    """The command line that started this process (interpreter, its flags, the script or `-m captioner`,
    the arguments), to run again; None where sys.argv is not that process's own (code that called the
    entry with a replaced sys.argv, `python -c`)."""
    n = len(argv)
    if not executable or not argv or len(orig_argv) <= n:
        return None
    if list(orig_argv[len(orig_argv) - n + 1:]) != list(argv[1:]):
        return None
    at = len(orig_argv) - n  # the script, or the module after -m
    script = orig_argv[at] == argv[0]
    module = (orig_argv[at] == "captioner" and orig_argv[at - 1] == "-m") or orig_argv[at] == "-mcaptioner"
    return [executable, *orig_argv[1:]] if script or module else None


def reexec(environ: Mapping[str, str] | None = None) -> None:
    """Re-execute this process with the chosen allocator, if it needs one; returns where nothing changes.

    os.execv keeps the process id, stdin/stdout/stderr and the exit status's path, so shells, pipes and
    torchrun (which watches its workers by pid) see one process.
    """
    environ = os.environ if environ is None else environ
    changes = decide(environ, jemalloc_path(), _glibc())
    argv = entry_argv(sys.argv, getattr(sys, "orig_argv", ()), sys.executable) if changes else None
    if not changes or argv is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, {**environ, **changes})
    except OSError:  # cannot re-execute (an unusual interpreter): run as started
        return


def _loaded(name: str, maps: str) -> bool:
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            return any(name in line for line in f)
    except OSError:
        return False


def describe(environ: Mapping[str, str] | None = None, maps: str = "/proc/self/maps") -> str:
    """What allocates this process's memory and who chose it, for the log:
    "jemalloc (LD_PRELOAD, set by captioner)", "glibc (user's GLIBC_TUNABLES)", "glibc (default)"."""
    environ = os.environ if environ is None else environ
    def who(var: str) -> str:
        return f"{var}, set by captioner" if environ.get(MARKER) else f"user's {var}"

    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if _loaded(f"lib{lib}", maps):
            return f"{lib} ({who('LD_PRELOAD')})"
    if environ.get("GLIBC_TUNABLES"):
        return f"glibc ({who('GLIBC_TUNABLES')})"
    choice = environ.get(CHOICE, "").strip().lower()
    if choice and choice not in CHOICES:
        return f"glibc (default; {CHOICE}={choice!r} is none of {', '.join(CHOICES)})"
    return "glibc (default)" if _glibc() else "the system's malloc"


def print_line(file=None) -> None:
    """One line "allocator: ..." (the benchmarks print it first)."""
    print(f"allocator: {describe()}", file=file or sys.stdout, flush=True)
