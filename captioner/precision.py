"""Which number format the matrix multiplies run in: fp32, or bf16 autocast where the hardware has it.

    precision = resolve("auto", device)          # a Precision: .name, .reason, .autocast()
    with precision.autocast():
        logits = model(features, inputs)          # GEMMs and convolutions in bf16
    loss = F.cross_entropy(logits.float(), ...)   # the loss, and everything after it, in fp32

bf16 autocast lowers only the matrix multiplies and convolutions (PyTorch's autocast op list): parameters
stay fp32 (the master weights the optimizer updates, with fp32 state), gradients reach them in fp32, and
every caller turns logits back to fp32 before the log-softmax, the loss, beam scores, sampling
probabilities and rewards.

`auto` chooses bf16 only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 is
emulated and several times *slower* than fp32, so `auto` never picks it there; asking for `bf16`
explicitly still works (with a warning), which the tests use to check the bf16 numerics on any machine.
On CUDA `auto` is bf16 where the GPU supports it, else fp16 with a gradient scaler, as before.

This module holds no state: `resolve` returns a frozen value that callers pass down explicitly. The names
it takes are captioner.choices.PRECISIONS; a caller that names none gets `default(device)`, which is
captioner.choices.DEFAULT_PRECISION (auto) as on the command line.

Test hook: CAPTIONER_AUTO_PRECISION=bf16|fp32 in the environment makes `auto` on the CPU find that
precision instead of reading the CPU's flags, so the test suite can be run as on a CPU with native bf16
and as on one without, on any machine (`pytest --auto-precision=bf16` sets it for the run and its
subprocesses; docs/precision.md). It is read at each call, changes nothing else (explicit `fp32`/`bf16`,
CUDA, and calls that pass `flags` are as before), and is for tests only: users ask for a precision with
`--precision` or `train.precision`.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.choices import DEFAULT_PRECISION, PRECISIONS
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

# /proc/cpuinfo flags meaning the CPU has bf16 matrix instructions (not emulation on fp32 units).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Test hook: what `auto` finds on the CPU, instead of the CPU's flags (see the module docstring).
AUTO_OVERRIDE_ENV = "CAPTIONER_AUTO_PRECISION"
AUTO_OVERRIDES = ("fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    name: str          # "fp32", "bf16", or "fp16" (CUDA without bf16 only)
    device_type: str   # "cpu" or "cuda"
    reason: str = ""   # why it was chosen, for the log line

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def reduced(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        """A fresh context manager: autocast to this precision, or nothing for fp32."""
        if not self.reduced:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; bf16 has fp32's exponent range and fp32 needs nothing (disabled no-op)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    def describe(self) -> str:
        """One plain line: "precision: fp32 on cpu (auto: the CPU has no native bf16 ...)"."""
        return f"precision: {self.name} on {self.device_type} ({self.reason})"

    @property
    def slow(self) -> bool:
        """bf16 asked for where it is emulated: slower than fp32, which the user should hear about."""
        return self.name == "bf16" and "slower" in self.reason


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    return _read_flags(str(path))


@functools.lru_cache(maxsize=4)
def _read_flags(path: str) -> frozenset[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | ARM
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(does this CPU multiply bf16 natively?, the evidence) from the CPU flags (read when not given)."""
    flags = cpu_flags() if flags is None else flags
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU has native bf16 ({', '.join(found)})"
    if flags:
        return False, "the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"
    return False, "the CPU's bf16 support could not be read (no /proc/cpuinfo flags)"


def auto_override() -> str | None:
    """The precision CAPTIONER_AUTO_PRECISION forces `auto` to on the CPU (a test hook), or None when unset."""
    value = os.environ.get(AUTO_OVERRIDE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in AUTO_OVERRIDES:
        raise CaptionerError(f"{AUTO_OVERRIDE_ENV} must be one of {', '.join(AUTO_OVERRIDES)} (or unset), "
                             f"got {os.environ[AUTO_OVERRIDE_ENV]!r}")
    return value


def resolve(name: str, device: torch.device | str = "cpu", flags: frozenset[str] | None = None) -> Precision:
    """The precision `name` ("auto" | "fp32" | "bf16") means on `device`; `flags` fakes the CPU flags.

    Without `flags`, `auto` on the CPU honours the CAPTIONER_AUTO_PRECISION test hook when it is set."""
    if name not in PRECISIONS:
        raise CaptionerError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    kind = torch.device(device).type
    if kind == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if name == "fp32":
            return Precision("fp32", kind, "asked for")
        if name == "bf16":
            if not supported:
                raise CaptionerError("precision bf16 was asked for, but this GPU does not support bf16")
            return Precision("bf16", kind, "asked for")
        if supported:
            return Precision("bf16", kind, "auto: the GPU supports bf16")
        return Precision("fp16", kind, "auto: the GPU has no bf16; fp16 with a gradient scaler")
    if kind != "cpu":
        return Precision("fp32", kind, f"auto: no reduced precision on {kind}")
    if name == "auto" and flags is None:
        forced = auto_override()
        if forced is not None:
            return Precision(forced, kind, f"auto: forced to {forced} by {AUTO_OVERRIDE_ENV} (a test hook)")
    native, evidence = native_bf16(flags)
    if name == "fp32":
        return Precision("fp32", kind, "asked for")
    if name == "bf16":
        if native:
            return Precision("bf16", kind, f"asked for; {evidence}")
        return Precision("bf16", kind, f"asked for, although {evidence}: bf16 is emulated there, expect it "
                                       "to be slower than fp32")
    return Precision("bf16" if native else "fp32", kind, f"auto: {evidence}")


def announce(precision: Precision, verbose_only: bool = False) -> Precision:
    """Log the one line saying which precision runs and why; returns it.

    Training says it always (it decides speed and the checkpoint's numerics); a command that only decodes
    passes verbose_only and says it under --verbose alone. Emulated bf16, slower than fp32, is a warning
    either way."""
    level = logging.WARNING if precision.slow else logging.DEBUG if verbose_only else logging.INFO
    log.log(level, "%s", precision.describe())
    return precision


def default(device: torch.device | str = "cpu") -> Precision:
    """What a caller that names no precision gets: DEFAULT_PRECISION (auto), as every command and the config
    do, resolved on `device`."""
    return resolve(DEFAULT_PRECISION, device)


FP32 = Precision("fp32", "cpu", "default")  # plain fp32 on the CPU, for callers that ask for it by value
