"""Config layering: defaults, TOML file, --set overrides; clear errors for bad keys and values."""

from pathlib import Path

import pytest

from captioner.config import Config, load_config, to_toml
from captioner.errors import CaptionerError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\ncell = 'gru'\nhidden_dim = 64\n[train]\nlr = 1\n")
    cfg = load_config(path, ["model.hidden_dim=128", "train.label_smoothing=0.1"])
    assert cfg.model.cell == "gru" and cfg.model.hidden_dim == 128
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.label_smoothing == 0.1
    assert cfg.model.embed_dim == Config().model.embed_dim  # untouched default


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["model.cell=rnn", "data.root=/some where/x", "model.tie_weights=true",
                             "model.embed_dim=512"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override,message", [
    ("model.hiden_dim=3", "did you mean 'hidden_dim'"),
    ("modle.cell=gru", "did you mean 'model'"),
    ("model.hidden_dim=big", "model.hidden_dim: expected int"),
    ("model.hidden_dim=-4", "model.hidden_dim must be positive"),
    ("model.cell=transformer", "model.cell must be one of"),
    ("train.epochs=0", "train.epochs must be positive"),
    ("model.tie_weights=maybe", "expected bool"),
    ("nodot=1", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(CaptionerError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(CaptionerError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ncell=")
    with pytest.raises(CaptionerError, match="not a valid TOML"):
        load_config(bad)
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text("[model]\nhidden_dim = 'wide'\n")
    with pytest.raises(CaptionerError, match="model.hidden_dim: expected int"):
        load_config(wrong_type)
