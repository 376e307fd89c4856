"""What `evaluate --json` and the analysis figures and pages write is whole or absent: a disk that fills up
(or a kill) mid-write leaves the previous file, never half of a new one, and no temporary behind.

The full disk is real: RLIMIT_FSIZE makes every write past a few kilobytes fail with EFBIG, as a full
disk fails it with ENOSPC, for the one call under test."""

import contextlib
import os
import resource
import signal

import pytest
import torch

from captioner.analysis import gradient_flow as gf
from captioner.analysis import interpret
from captioner.commands.evaluate import write_report
from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder
from test_lessons import tiny_trained_model

LIMIT = 4096  # bytes: every file under test is larger


@contextlib.contextmanager
def disk_full_after(nbytes: int):
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def keeps_the_old_file(path, write) -> None:
    path.write_bytes(b"the previous file")
    with pytest.raises(OSError), disk_full_after(LIMIT):
        write()
    assert path.read_bytes() == b"the previous file"
    assert os.listdir(path.parent) == [path.name]  # no temporary left behind
    write()  # with room on the disk: the whole new file
    assert path.stat().st_size > LIMIT


@pytest.fixture(scope="module")
def cells_report():
    model, vocab, feats = tiny_trained_model()
    return interpret.analyse(model, vocab, feats, n_best=3, max_len=10)


def test_evaluate_json_report(tmp_path):
    report = {"totals": {"CIDEr": 50.0}, "per_image": [{"image": f"img{i}.jpg", "caption": "a dog runs"}
                                                       for i in range(200)]}
    keeps_the_old_file(tmp_path / "eval.json", lambda: write_report(tmp_path / "eval.json", report))


def test_gradient_flow_figure(tmp_path):
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig(cell="gru", embed_dim=8, hidden_dim=8, dropout=0.0), 20, 4)
    flows = [gf.measure(model, "gru", steps=6, batch=2)]
    keeps_the_old_file(tmp_path / "flow.png", lambda: gf.plot(flows, tmp_path / "flow.png"))


def test_cells_heatmap_and_page(tmp_path, cells_report):
    (tmp_path / "png").mkdir()
    (tmp_path / "html").mkdir()
    png, page = tmp_path / "png" / "cells.png", tmp_path / "html" / "cells.html"
    keeps_the_old_file(png, lambda: interpret.write_heatmap(cells_report, png))
    keeps_the_old_file(page, lambda: interpret.write_html(cells_report, page))
