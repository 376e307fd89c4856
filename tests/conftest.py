"""Shared fixtures.

Real-data tests use the datasets folder named by CAPTIONER_DATA (CI sets it to ../shared/datasets), or
../shared/datasets beside the checkout; they skip with a reason when neither exists.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
