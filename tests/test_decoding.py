"""One Decoding value: its defaults and rules in one place, the shared command-line options that build
it, its journey through the Captioner, the server's batching and beam search, and the Searchable protocol
the searches drive."""

import argparse
import asyncio
import sys
from dataclasses import replace

import pytest
import torch

from captioner.cli import build_parser, decoding_of
from captioner.errors import CaptionerError
from captioner.model.decoding import Decoding, Guards, Rerank


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _group_options(command: str, title: str) -> list[str]:
    group = next(g for g in _subparser(command)._action_groups if g.title == title)
    return [s for action in group._group_actions for s in action.option_strings]


def test_serve_offers_every_decoding_option_caption_does():
    caption, serve = _group_options("caption", "decoding"), _group_options("serve", "decoding")
    assert caption == serve and "--length-penalty" in serve and "--end-guard" in serve and "--rerank-k" in serve
    assert _group_options("evaluate", "decoding") == [o for o in caption if o != "--n-best"]
    assert _group_options("caption", "model") == _group_options("serve", "model") == _group_options("evaluate", "model")
    helped = _subparser("serve").format_help()
    assert all(option in helped for option in caption + ["--precision"])


def test_the_options_default_to_decoding_defaults():
    for command in (["caption", "x.jpg"], ["evaluate", "--data", "d"], ["serve"]):
        assert decoding_of(build_parser().parse_args(command)) == Decoding()
    args = build_parser().parse_args(["serve", "--beam-size", "5", "--n-best", "2", "--length-penalty", "0.5",
                                      "--no-end-guard", "--rerank", "0", "--max-len", "12"])
    assert decoding_of(args) == Decoding(beam_size=5, n_best=2, length_penalty=0.5, max_len=12,
                                         guards=Guards(end=False), rerank=Rerank.off())


def test_decoding_defaults():
    d = Decoding()
    assert (d.beam_size, d.max_len, d.n_best, d.length_penalty) == (3, 20, 1, 0.0)
    assert d.guards == Guards() and d.rerank == Rerank()


@pytest.mark.parametrize("settings,field", [
    ({"beam_size": 0}, "beam_size must be at least 1, got 0"),
    ({"beam_size": 2.5}, "beam_size must be at least 1"),
    ({"beam_size": True}, "beam_size must be at least 1"),
    ({"max_len": 0}, "max_len must be at least 1, got 0"),
    ({"n_best": 4, "beam_size": 2}, "n_best must be between 1 and the beam size (2), got 4"),
    ({"n_best": 0}, "n_best must be between 1"),
    ({"length_penalty": -1.0}, "length_penalty must be 0 (off) or positive, got -1.0"),
    ({"length_penalty": float("nan")}, "length_penalty must be 0 (off) or positive"),
    ({"rerank": Rerank(k=0)}, "neighbours consulted (k)"),
    ({"guards": "off"}, "guards must be a Guards"),
])
def test_each_rule_is_checked_when_the_value_is_made(settings, field):
    with pytest.raises(CaptionerError) as info:
        Decoding(**settings)
    assert field in str(info.value)
    with pytest.raises(CaptionerError):  # replacing a field is checked the same way
        replace(Decoding(), **settings)


def test_errors_from_the_command_line_name_the_options():
    for argv, message in ((["--beam-size", "0"], "--beam-size must be at least 1, got 0"),
                          (["--max-len", "0"], "--max-len must be at least 1, got 0"),
                          (["--n-best", "5"], "--n-best must be between 1 and the beam size (3), got 5"),
                          (["--length-penalty", "-1"], "--length-penalty must be 0 (off) or positive")):
        with pytest.raises(CaptionerError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            decoding_of(build_parser().parse_args(["serve", *argv]))


def test_settings_replace_fields_and_unknown_ones_are_refused():
    base = Decoding(beam_size=5, guards=Guards.off())
    assert Decoding.of(base) is base
    assert Decoding.of(base, max_len=7) == Decoding(beam_size=5, max_len=7, guards=Guards.off())
    assert Decoding.of(None, beam_size=4) == Decoding(beam_size=4)
    with pytest.raises(TypeError, match="beam_width"):
        Decoding.of(base, beam_width=4)


def test_the_command_line_builds_a_decoding_without_torch():
    import subprocess

    code = ("import sys; from captioner.cli import build_parser, decoding_of; "
            "decoding_of(build_parser().parse_args(['serve', '--beam-size', '4'])); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ---- through the server's batching --------------------------------------------------------------------

class RecordingCaptioner:
    def __init__(self):
        self.calls = []

    def caption_pil(self, images, decoding, batch_size):
        self.calls.append((len(images), decoding))
        return [[f"{img}/{k}" for k in range(decoding.n_best)] for img in images]


def test_the_batcher_carries_each_request_s_decoding_whole():
    from captioner.serve.batching import Batcher

    fake = RecordingCaptioner()
    plain = Decoding(guards=Guards.off(), length_penalty=0.5)

    async def main():
        batcher = Batcher(fake, max_batch=16, max_wait_ms=50)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.caption("a", plain), batcher.caption("b", replace(plain, n_best=2)),
                                        batcher.caption("c"))
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results == [["a/0"], ["b/0", "b/1"], ["c/0"]]
    # The two that differ only in n_best share a batch decoded with the larger; the default one runs apart.
    assert sorted(fake.calls, key=lambda c: -c[0]) == [(2, replace(plain, n_best=2)), (1, Decoding())]


# ---- the search protocol --------------------------------------------------------------------------------

def test_every_decoder_the_searches_drive_is_searchable():
    from captioner.config import ModelConfig
    from captioner.model.constraints import EndGuard, NoRepeatNgram, NoRepeatWord
    from captioner.model.decoder import CaptionDecoder
    from captioner.model.ensemble import Ensemble
    from captioner.model.search import Searchable, SuppressWords, beam_search

    decoder = CaptionDecoder(ModelConfig(embed_dim=8, hidden_dim=8), vocab_size=12, feature_dim=6).eval()
    wrapped = [Ensemble([decoder, decoder]), SuppressWords(decoder, [0]), NoRepeatNgram(decoder, 2),
               NoRepeatWord(decoder), EndGuard(decoder, 2, [5], [6], [7], None)]
    for model in [decoder, *wrapped]:
        assert isinstance(model, Searchable), type(model).__name__
    assert not isinstance(object(), Searchable)
    torch.manual_seed(0)
    feats = torch.randn(2, 6)
    by_value = beam_search(decoder, feats, Decoding(beam_size=3, n_best=2, max_len=6))
    assert by_value == beam_search(decoder, feats, beam_size=3, n_best=2, max_len=6)
    assert all(len(h) == 2 for h in by_value)
