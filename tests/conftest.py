"""Shared fixtures.

Real-data tests use the datasets folder named by CAPTIONER_DATA (CI sets it to ../shared/datasets), or
../shared/datasets beside the checkout; they skip with a reason when neither exists.

`--auto-precision=bf16|fp32` runs the suite as on a CPU with native bf16 or as on one without, on any
machine: it sets the CAPTIONER_AUTO_PRECISION test hook (captioner/precision.py) for the run, and so for
the subprocesses the tests start. Without it `auto` finds what this CPU has; the header says which.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AUTO_ENV = "CAPTIONER_AUTO_PRECISION"  # captioner.precision.AUTO_OVERRIDE_ENV


def pytest_addoption(parser):
    parser.addoption("--auto-precision", choices=("bf16", "fp32"), default=None,
                     help="make precision 'auto' on the CPU resolve to this, whatever the CPU has "
                          f"(sets {AUTO_ENV} for the run and its subprocesses)")


def pytest_configure(config):
    forced = config.getoption("--auto-precision")
    config._captioner_auto_env = os.environ.get(AUTO_ENV)
    if forced:
        os.environ[AUTO_ENV] = forced


def pytest_unconfigure(config):
    before = getattr(config, "_captioner_auto_env", None)
    if before is None:
        os.environ.pop(AUTO_ENV, None)
    else:
        os.environ[AUTO_ENV] = before


def pytest_report_header(config):
    from captioner.precision import resolve

    try:
        return f"captioner: auto on the CPU gives {resolve('auto', 'cpu').describe()}"
    except Exception as exc:  # a bad CAPTIONER_AUTO_PRECISION: say so here, the tests will fail on it
        return f"captioner: precision auto on the CPU could not be resolved: {exc}"


def _datasets_root() -> Path | None:
    env = os.environ.get("CAPTIONER_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "datasets")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    root = _datasets_root()
    if root is None:
        pytest.skip("real data absent: set CAPTIONER_DATA to a folder holding flickr8k/ and coco-mini/")
    return root


@pytest.fixture(scope="session")
def flickr8k_root(datasets_root) -> Path:
    path = datasets_root / "flickr8k"
    if not path.is_dir():
        pytest.skip(f"real data absent: {path} does not exist")
    return path


@pytest.fixture(scope="session")
def coco_mini_root(datasets_root) -> Path:
    path = datasets_root / "coco-mini"
    if not path.is_dir():
        pytest.skip(f"real data absent: {path} does not exist")
    return path
