"""The model shipped inside the package: small, safe to load, captions the example photos, and evaluate.py
scores it exactly as a direct pycocoevalcap call does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.inference import Captioner, default_checkpoint
from captioner.model.ensemble import Ensemble
from captioner.eval.metrics import java_available

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", checkpoint.DEFAULT_MODELS)
def test_shipped_models_are_float16_and_rebuild_themselves(name):
    path = checkpoint.pretrained_path(name)
    ckpt = checkpoint.read(path)  # weights_only=True inside
    assert all(t.dtype == torch.float16 for t in ckpt["model"].values() if t.is_floating_point())
    loaded = checkpoint.load_model(path)
    # the project's design: v is injected at every step ("both" also sets h_0 from v)
    assert loaded.model.cfg.conditioning in ("inject", "both")
    assert ckpt["provenance"]["dev_metrics"]["BLEU-4"] > 0


def test_the_default_is_the_ensemble_of_the_shipped_models_and_stays_small():
    paths = checkpoint.default_checkpoints()
    assert [p.stem for p in paths] == list(checkpoint.DEFAULT_MODELS)
    assert sum(p.stat().st_size for p in paths) < 40e6
    assert default_checkpoint() == checkpoint.pretrained_path(checkpoint.SINGLE_MODEL) in paths
    members = [checkpoint.load_model(p) for p in paths]
    assert len({len(m.vocab) for m in members}) == 1  # an ensemble reads one vocabulary
    cap = Captioner.from_pretrained(device="cpu", precision="fp32")
    assert isinstance(cap.model, Ensemble) and len(cap.model.members) == len(paths)
    for member, loaded in zip(cap.model.members, members):
        assert member.cfg == loaded.model.cfg
    single = Captioner.from_pretrained(checkpoint.SINGLE_MODEL, device="cpu", precision="fp32")
    assert not isinstance(single.model, Ensemble)
    # the ensemble averages its members' next-word probabilities (captioner.model.ensemble)
    features = torch.randn(2, single.model.feature_dim)
    tokens = torch.full((2,), cap.vocab.start_id)
    with torch.no_grad():
        mixed, _ = cap.model.step(tokens, cap.model.init_state(features))
        each = [m.model.step(tokens, m.model.init_state(features))[0].exp() for m in members]
    torch.testing.assert_close(mixed.exp(), sum(each) / len(each), rtol=1e-5, atol=1e-6)


def test_caption_cli_on_the_example_photos():
    proc = run_cli("caption.py", "examples/")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("\t") for line in proc.stdout.strip().splitlines())
    assert len(lines) == 3
    for path, caption in lines.items():
        words = caption.split()
        assert 3 <= len(words) <= 20 and "<unk>" not in words, (path, caption)
    # the skateboarder is a person doing something on a board, whatever the exact words
    skate = lines[str(Path("examples/skateboarder.jpg"))]
    assert {"man", "boy", "person", "skateboarder", "skater"} & set(skate.split()), skate


@pytest.mark.realdata
def test_evaluate_equals_a_direct_pycocoevalcap_call(flickr8k_root, tmp_path):
    if not java_available():
        pytest.skip("Java is needed for the PTB tokenizer that the direct call uses")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = tmp_path / "eval.json"
    proc = run_cli("evaluate.py", "--data", flickr8k_root, "--split", "val", "--limit", "100", "--no-meteor",
                   "--cache-dir", tmp_path / "cache", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "BLEU-4" in proc.stdout and "100" in proc.stdout
    report = json.loads(out.read_text())
    assert report["images"] == 100
    gts = {i: [{"caption": c} for c in e["references"]] for i, e in enumerate(report["per_image"])}
    res = {i: [{"caption": e["caption"]}] for i, e in enumerate(report["per_image"])}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    direct = {f"BLEU-{n + 1}": 100 * b for n, b in enumerate(bleu)}
    direct["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    for key, value in direct.items():
        assert report["totals"][key] == pytest.approx(value, abs=1e-9), key
