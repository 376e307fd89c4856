"""Checkpoints from disks and strangers: every damaged, foreign, old or hostile file is one line naming it.

Small decoders built here (no training); the CLI cases run caption.py, which loads the checkpoint before
it touches any image or the encoder.
"""

import contextlib
import os
import pickle
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.config import ModelConfig
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder
from captioner.errors import CaptionerError

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(cell="lstm", embed_dim=8, hidden_dim=8, dropout=0.0)
WORDS = ("<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "grass")
ENCODER = {"name": "efficientnet_lite0", "weights": "test", "feature_dim": 6}


def payload(cfg: ModelConfig = CFG, words=WORDS, feature_dim: int = 6) -> dict:
    torch.manual_seed(0)
    model = CaptionDecoder(cfg, vocab_size=len(words), feature_dim=feature_dim)
    return checkpoint.model_payload(model, Vocabulary(words), ENCODER)


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(CaptionerError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_round_trip_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "run" / "last.pt"
    checkpoint.save(path, payload())
    loaded = checkpoint.load_model(path)
    for key, value in payload()["model"].items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    assert loaded.vocab == Vocabulary(WORDS) and loaded.checkpoint["format_version"] == checkpoint.FORMAT_VERSION
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_failed_write_keeps_the_old_checkpoint_and_leftovers_are_cleaned(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload())
    before = path.read_bytes()

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        checkpoint.save(path, payload(replace(CFG, hidden_dim=16)))
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]

    # A writer killed by SIGKILL cannot clean up: its temporary file stays until the next save.
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    checkpoint.read(path)  # never looks at it
    checkpoint.save(path, payload())
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[: len(data) // 2], "truncated or corrupt"),
    (lambda data: data[:-10], "truncated or corrupt"),
    (lambda data: data[:100], "truncated or corrupt"),
    (lambda data: os.urandom(len(data)), "not a PyTorch checkpoint"),
    (lambda data: b"", "empty file"),
    (lambda data: b"model weights, honest\n", "not a PyTorch checkpoint"),
])
def test_damaged_files(tmp_path, damage, message):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, payload())
    path.write_bytes(damage(path.read_bytes()))
    text = error_of(checkpoint.load_model, path)
    assert text.startswith(f"{path}: ") and message in text


def test_missing_path_and_directory(tmp_path):
    assert "not found" in error_of(checkpoint.read, tmp_path / "nope.pt")
    assert "is a directory" in error_of(checkpoint.read, tmp_path)


def test_a_directory_named_like_a_checkpoint_says_it_is_a_directory(tmp_path):
    folder = tmp_path / "x.pt"
    folder.mkdir()
    assert error_of(checkpoint.pretrained_path, folder) == f"{folder}: is a directory, not a checkpoint file"
    checkpoint.save(tmp_path / "run" / "best.pt", payload())
    assert error_of(checkpoint.pretrained_paths, [str(tmp_path / "run")]) == (
        f"{tmp_path / 'run'}: is a directory, not a checkpoint file (the checkpoint in it: {tmp_path / 'run' / 'best.pt'})")
    assert "not found" in error_of(checkpoint.pretrained_path, tmp_path / "y.pt")


@pytest.mark.parametrize("cfg", [
    ModelConfig(cell="lstm", embed_dim=8, hidden_dim=8),
    ModelConfig(cell="gru", embed_dim=6, hidden_dim=10, num_layers=3, conditioning="both", highway=True),
    ModelConfig(cell="rnn", embed_dim=8, hidden_dim=8, num_layers=2, conditioning="init", tie_weights=True),
    ModelConfig(cell="lstm", embed_dim=7, hidden_dim=9, num_layers=2, conditioning="both", highway=True,
                highway_coupled=False),
])
def test_the_size_estimate_is_the_built_models(cfg):
    model = CaptionDecoder(cfg, vocab_size=13, feature_dim=5)
    assert checkpoint.decoder_parameters(cfg, 13, 5) == sum(p.numel() for p in model.parameters())


def test_a_config_describing_an_absurd_decoder_is_refused_before_it_is_built(tmp_path, monkeypatch):
    ckpt = payload()
    ckpt["model_config"] = {**ckpt["model_config"], "hidden_dim": 30000}  # 10.8 GB of weights it does not hold
    path = tmp_path / "huge.pt"
    torch.save(ckpt, path)
    built = []
    monkeypatch.setattr(checkpoint, "CaptionDecoder", lambda *a, **k: built.append(a) or CaptionDecoder(*a, **k))
    message = error_of(checkpoint.load_model, path)
    assert message.startswith(f"{path}: its config describes a decoder of 3.6e+09 parameters (14.4 GB; "
                              "model.hidden_dim 30000, model.embed_dim 8, 1 layer(s), 9 words), more than any "
                              "captioning decoder needs (")
    assert message.endswith("a damaged or hostile checkpoint; not built") and built == []
    monkeypatch.setattr(checkpoint, "_memory_bytes", lambda: 64 * 1024**3)
    assert "(the limit is 2 GiB)" in error_of(checkpoint.load_model, path)
    monkeypatch.setattr(checkpoint, "_memory_bytes", lambda: 1024**3)
    ckpt["model_config"]["hidden_dim"] = 6000  # 580 MB: fine on most machines, not on one with 1 GiB
    torch.save(ckpt, path)
    assert "half of this machine's 1.0 GiB of memory" in error_of(checkpoint.load_model, path)


@pytest.mark.parametrize("write", [
    lambda obj, path: torch.save(obj, path),
    lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=4)),
])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, write):
    marker = tmp_path / "code ran"
    hostile = {**payload(), "format_version": 1, "extra": RunsCode(marker)}
    path = tmp_path / "gift.pt"
    write(hostile, path)
    assert "refused to load" in error_of(checkpoint.load_model, path)
    assert not marker.exists()
    # The payload is live: an unguarded loader runs it (a plain pickle then fails torch's magic-number check).
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("weights_cfg,words,expected", [
    (replace(CFG, cell="gru"), WORDS, "model.cell: lstm vs gru"),
    (replace(CFG, hidden_dim=16), WORDS, "model.hidden_dim: 8 vs 16"),
    (replace(CFG, num_layers=2), WORDS, "model.num_layers: 1 vs 2"),
    (replace(CFG, conditioning="init"), WORDS, "model.conditioning: inject vs init"),
    (CFG, WORDS + ("extra", "words"), "vocabulary size: 9 vs 11"),
])
def test_weights_of_another_architecture_say_what_differs(tmp_path, weights_cfg, words, expected):
    ckpt = {**payload(), "model": payload(weights_cfg, words)["model"]}  # config and vocab of CFG/WORDS
    path = tmp_path / "mixed.pt"
    checkpoint.save(path, ckpt)
    text = error_of(checkpoint.load_model, path)
    assert text.startswith(f"{path}: ") and expected in text and "described vs weights" in text


def test_feature_size_mismatch_and_expected_architecture(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {**payload(), "model": payload(feature_dim=10)["model"]})
    assert "feature_dim: 6 vs 10" in error_of(checkpoint.load_model, path)
    checkpoint.save(path, payload())
    text = error_of(checkpoint.load_model, path, expected=replace(CFG, cell="gru", hidden_dim=32))
    assert "another architecture" in text and "model.cell: lstm vs gru; model.hidden_dim: 8 vs 32" in text
    assert checkpoint.load_model(path, expected=CFG).model.cfg == CFG


def test_format_0_is_migrated(tmp_path):
    """Format 0 had no format_version and stored the vocabulary as a plain list of words."""
    old = {k: v for k, v in payload().items() if k != "format_version"}
    old["vocab"] = list(WORDS)
    path = tmp_path / "old.pt"
    torch.save(old, path)
    loaded = checkpoint.load_model(path)
    assert loaded.vocab == Vocabulary(WORDS) and loaded.checkpoint["format_version"] == 1
    for key, value in old["model"].items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    torch.save({**old, "vocab": ["dog", "a"]}, path)  # no special tokens: not a vocabulary we wrote
    assert error_of(checkpoint.load_model, path).startswith(f"{path}: vocabulary must start with <pad>")


@pytest.mark.parametrize("change,message", [
    ({"format_version": 99}, "format 99 is newer than this captioner understands (1); upgrade"),
    ({"format_version": "one"}, "format_version 'one'"),
    ({"model_config": {**asdict(CFG), "attention": True}}, "unknown config key model.attention"),
    ({"model_config": {**asdict(CFG), "hidden_dim": -8}}, "model.hidden_dim must be positive"),
    ({"model": {"embed.weight": [1, 2]}}, "model has the wrong type"),
    ({"feature_dim": "6"}, "feature_dim has the wrong type"),
    ({"vocab": {"format": "something else"}}, "not a captioner vocabulary"),
])
def test_foreign_or_damaged_contents(tmp_path, change, message):
    path = tmp_path / "ckpt.pt"
    torch.save({**payload(), "format_version": 1, **change}, path)
    text = error_of(checkpoint.load_model, path)
    assert text.startswith(f"{path}: ") and message in text


def test_bare_state_dict_and_lists_are_not_checkpoints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(payload()["model"], path)
    assert "bare state_dict" in error_of(checkpoint.read, path)
    torch.save([torch.zeros(2)], path)
    assert "holds a list" in error_of(checkpoint.read, path)


def test_resume_needs_training_state(tmp_path):
    path = tmp_path / "shipped.pt"
    checkpoint.save(path, payload())
    checkpoint.read(path)  # fine for captioning
    assert "can caption but not resume" in error_of(checkpoint.read, path, training=True)


def bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.pt"
    checkpoint.save(good, payload())
    cases = {}
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-200])
    cases["truncated"] = truncated, "truncated or corrupt"
    hostile = tmp_path / "hostile.pt"
    torch.save({**payload(), "format_version": 1, "extra": RunsCode(tmp_path / "code ran")}, hostile)
    cases["hostile"] = hostile, "refused to load: it would call posix.system"
    mixed = tmp_path / "other architecture.pt"
    checkpoint.save(mixed, {**payload(), "model": payload(replace(CFG, cell="gru"))["model"]})
    cases["other architecture"] = mixed, "model.cell: lstm vs gru"
    newer = tmp_path / "newer.pt"
    torch.save({**payload(), "format_version": 2}, newer)
    cases["newer"] = newer, "newer than this captioner understands"
    return cases


@pytest.mark.parametrize("case", ["truncated", "hostile", "other architecture", "newer"])
def test_caption_cli_refuses_bad_checkpoint_in_one_line(tmp_path, case):
    path, message = bad_checkpoints(tmp_path)[case]
    proc = subprocess.run([sys.executable, "caption.py", "examples/street.jpg", "--checkpoint", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # exactly one line
    assert proc.stderr.startswith(f"error: {path}: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "code ran").exists()


def test_every_key_a_checkpoint_holds_is_named_in_the_schema(tmp_path):
    from dataclasses import fields

    from captioner.data.holdout import Holdout
    from captioner.vision.encoders import EncoderSpec

    assert {f.name for f in fields(checkpoint.TrainingState)} == {*checkpoint.TRAINING_KEYS, "metrics"}
    torch.manual_seed(0)
    model = CaptionDecoder(CFG, vocab_size=len(WORDS), feature_dim=6)
    spec = EncoderSpec.from_dict({**ENCODER, "image_size": 224, "resize": 256, "mean": (0.5,) * 3,
                                  "std": (0.5,) * 3, "interpolation": "bicubic"})
    state = checkpoint.TrainingState({}, {}, 3, 30, 0.5, 1, {"loss": 2.0})
    held = Holdout(("a.jpg",), 0.25, 0, 4)
    plain = checkpoint.training_payload(model, Vocabulary(WORDS), spec, state)
    full = checkpoint.training_payload(model, Vocabulary(WORDS), spec, state, encoder_state={"w": torch.zeros(1)},
                                       holdout=held, new_words_from=7)
    optional = {checkpoint.ENCODER_STATE, checkpoint.HOLDOUT, checkpoint.NEW_WORDS_FROM}
    assert set(plain) == {*checkpoint.MODEL_KEYS, *checkpoint.TRAINING_KEYS, "metrics"}
    assert set(full) == set(plain) | optional  # written only where they apply
    checkpoint.save(tmp_path / "last.pt", full)
    loaded = checkpoint.load_model(tmp_path / "last.pt")
    assert loaded.holdout(tmp_path / "last.pt") == held and loaded.new_words_from == 7
    assert set(loaded.checkpoint) == set(full) | {checkpoint.FORMAT}
    checkpoint.export(tmp_path / "last.pt", tmp_path / "model.pt")
    exported = checkpoint.read(tmp_path / "model.pt")
    assert set(exported) == {*checkpoint.MODEL_KEYS, checkpoint.PROVENANCE, checkpoint.HOLDOUT, checkpoint.FORMAT}
    assert checkpoint.recorded_holdout(exported, "model.pt") == held
