"""Each setting's choices are listed once (captioner.choices), and the command line, the config and the
code that acts on a choice all take exactly those."""

import argparse
import dataclasses

import pytest

from captioner import choices
from captioner.cli import build_parser
from captioner.config import Config, validate
from captioner.errors import CaptionerError


def _option(command: list[str], flag: str) -> argparse.Action:
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return next(a for a in parser._actions if flag in a.option_strings)


def test_the_command_line_offers_the_listed_choices():
    for command in (["caption"], ["evaluate"], ["serve"]):
        precision = _option(command, "--precision")
        assert tuple(precision.choices) == choices.PRECISIONS and precision.default == choices.DEFAULT_PRECISION
        assert tuple(_option(command, "--device").choices) == choices.DEVICES
    assert tuple(_option(["analyze", "gradient-flow"], "--cells").choices) == choices.CELLS


def _config(section: str, **values) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


@pytest.mark.parametrize("section,key,listed", [
    ("model", "cell", choices.CELLS), ("model", "conditioning", choices.CONDITIONING),
    ("train", "precision", choices.PRECISIONS), ("train", "device", choices.DEVICES),
    ("encoder", "pooling", choices.POOLINGS),
])
def test_the_config_takes_the_listed_choices_and_no_other(section, key, listed):
    for value in listed:
        validate(_config(section, **{key: value}))
    with pytest.raises(CaptionerError, match=f"{section}.{key} must be"):
        validate(_config(section, **{key: "nonesuch"}))
    assert getattr(Config(), section).__dict__[key] in listed


def test_the_code_that_acts_on_a_choice_knows_the_listed_ones():
    import torch

    from captioner import precision
    from captioner.model.decoder import CELL_TYPES, CONDITIONING_INPUTS
    from captioner.vision.encoders import list_encoders, registry

    assert set(CELL_TYPES) == set(choices.CELLS) and set(CONDITIONING_INPUTS) == set(choices.CONDITIONING)
    assert list_encoders() == sorted(choices.ENCODERS)
    assert registry.POOLINGS is choices.POOLINGS
    assert precision.PRECISIONS is choices.PRECISIONS
    for name in choices.PRECISIONS:
        assert precision.resolve(name, "cpu", flags=frozenset()).name in ("fp32", "bf16")
    with pytest.raises(ValueError, match="captioner.choices.ENCODERS"):
        registry.register("an_unlisted_net")(lambda: None)
    assert precision.default(torch.device("cpu")) == precision.resolve(choices.DEFAULT_PRECISION, "cpu")


def test_a_captioner_given_no_precision_gets_the_commands_default(monkeypatch):
    """Not fp32 behind the user's back: what `auto` finds (here forced to bf16 by the test hook)."""
    from captioner import checkpoint, pretrained
    from captioner.inference import Captioner
    from captioner.precision import AUTO_OVERRIDE_ENV

    monkeypatch.setenv(AUTO_OVERRIDE_ENV, "bf16")
    cap = Captioner(checkpoint.load_model(pretrained.resolve(["flickr8k"])[0]))
    assert cap.precision.name == "bf16"
    monkeypatch.setenv(AUTO_OVERRIDE_ENV, "fp32")
    assert Captioner(checkpoint.load_model(pretrained.resolve(["flickr8k"])[0])).precision.name == "fp32"
