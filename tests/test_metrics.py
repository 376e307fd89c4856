"""COCO caption metrics: equal to pycocoevalcap called directly, Java and pure-Python tokenizers agree,
nltk's BLEU agrees on real captions, METEOR's JVM is shut down, input errors name the problem."""

import collections
import logging

import pytest

from captioner.errors import CaptionerError
from captioner.eval.metrics import (CaptionScorer, format_table, java_available, nltk_corpus_bleu, ptb_tokenize,
                               score_captions, tokenize_for_eval)

needs_java = pytest.mark.skipif(not java_available(), reason="no Java: PTB tokenizer and METEOR unavailable")

REFS = {
    "dog": ["A man's dog runs across the grass.", "A brown dog is running on the lawn!",
            "The dog, brown and white, runs (fast) outside."],
    17: ["Two black-and-white birds sit on a fence.", "Birds on a wooden fence -- perched.",
         "A pair of birds doesn't fly; they sit."],
    ("img", 3): ["A child in a red t-shirt plays soccer.", "A young boy kicks a ball at St. Mary's field.",
                 'A kid "playing" football on a field.'],
}
HYPS = {"dog": "A brown dog runs on the grass.", 17: "Two birds sit on a fence.",
        ("img", 3): "A boy in a red shirt kicks a ball."}


@pytest.fixture(scope="module")
def scorer():
    with CaptionScorer(meteor=True) as s:  # one METEOR JVM for the whole module
        yield s


@pytest.fixture(scope="module")
def flickr_pairs(flickr8k_root):
    """300 real images: caption #0 as the hypothesis, #1..#4 as the references."""
    captions = collections.defaultdict(list)
    with open(flickr8k_root / "Flickr8k.token.txt", encoding="utf-8") as f:
        for line in f:
            key, caption = line.rstrip("\n").split("\t")
            captions[key.split("#")[0]].append(caption)
    keys = sorted(captions)[:300]
    return {k: captions[k][1:5] for k in keys}, {k: captions[k][0] for k in keys}


def direct_pycocoevalcap(refs, hyps, meteor):
    """`meteor`: a pycocoevalcap Meteor (its JVM takes ~10 s to start, so the test lends the scorer's)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": hyps[k]}] for k in refs})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    out.update({f"BLEU-{n + 1}": 100 * b for n, b in enumerate(bleu)})
    out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    out["METEOR"] = 100 * meteor.compute_score(gts, res)[0]
    return out


@needs_java
def test_equals_pycocoevalcap_called_directly(scorer):
    ours = scorer.score(REFS, HYPS)
    direct = direct_pycocoevalcap(REFS, HYPS, meteor=scorer.meteor)  # pycocoevalcap's Meteor object
    assert set(ours.totals) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for metric, value in direct.items():
        assert ours[metric] == pytest.approx(value, abs=1e-9), metric
    # per-image scores are there for every key and metric, and are the means' parts
    assert set(ours.per_image) == set(REFS)
    mean_rouge = sum(s["ROUGE-L"] for s in ours.per_image.values()) / len(REFS)
    assert mean_rouge == pytest.approx(ours["ROUGE-L"])


@needs_java
def test_meteor_sane_failure_reported_missing_and_jvm_reaped(caplog):
    s = CaptionScorer(meteor=True)
    perfect = s.score({1: ["a dog runs on the grass"]}, {1: "a dog runs on the grass"})
    assert perfect["METEOR"] > 90
    proc = s.meteor.meteor_p
    proc.kill()  # the JVM dies under us: the other metrics must still come back
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="captioner"):
        scores = s.score(REFS, HYPS)
    assert "METEOR" not in scores.totals and "CIDEr" in scores.totals
    assert "METEOR failed" in caplog.text
    assert s.meteor is None and proc.returncode is not None  # closed and reaped: no zombie
    s.close()  # twice is fine

    s = CaptionScorer(meteor=True)
    s.score({1: ["a dog"]}, {1: "a dog"})
    proc = s.meteor.meteor_p
    s.close()
    assert proc.returncode is not None


def test_without_java_skips_meteor_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="captioner"):
        with CaptionScorer(meteor=True, use_java=False) as s:
            scores = s.score(REFS, HYPS)
            s.score(REFS, HYPS)
    assert "METEOR" not in scores.totals and scores["BLEU-4"] > 0
    assert len([r for r in caplog.records if "Java" in r.getMessage()]) == 1
    assert "METEOR" in format_table(scores, 3) and "not computed" in format_table(scores, 3)


TYPICAL = [
    "A man's dog runs.", "A black-and-white dog, jumping!", "Two dogs (one brown) play in the snow...",
    'A "happy" child -- smiling.', "The boy doesn't want it; he can't.", "Kids at St. Mary's school",
    "1,000 people at 5:30 in the U.S.", "A man - in red - runs", "Two kids' toys, a 10-year-old's bike?",
    "A dog 's ball .", "I'm sure they're ok", "A Slip 'n' Slide", "50% off $5 shirts",
]


@needs_java
def test_python_tokenizer_matches_java_on_typical_captions():
    java = tokenize_for_eval({i: [c] for i, c in enumerate(TYPICAL)}, use_java=True)
    assert [ptb_tokenize(c) for c in TYPICAL] == [java[i][0] for i in range(len(TYPICAL))]
    assert ptb_tokenize("A man's dog.") == "a man 's dog"


@needs_java
def test_java_and_python_paths_agree(flickr_pairs):
    # On real captions the two tokenizers agree on all but a handful of odd captions (at&t, "=" typos),
    # so corpus BLEU and CIDEr agree to well under 0.1 points.
    refs, hyps = flickr_pairs
    with CaptionScorer(meteor=False, use_java=True) as s:
        java = s.score(refs, hyps)
    with CaptionScorer(meteor=False, use_java=False) as s:
        python = s.score(refs, hyps)
    for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert python[metric] == pytest.approx(java[metric], abs=0.05), metric


def test_perfect_hypothesis_scores_bleu_100():
    refs = {i: [c, "something else entirely here"] for i, c in enumerate(TYPICAL)}
    hyps = {i: c for i, c in enumerate(TYPICAL)}
    scores = score_captions(refs, hyps, meteor=False)
    for metric in ("BLEU-1", "BLEU-4"):
        assert scores[metric] == pytest.approx(100.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(100.0)


@needs_java
def test_pycocoevalcap_bleu_matches_nltk_on_real_captions(flickr_pairs):
    refs, hyps = flickr_pairs
    coco = score_captions(refs, hyps, meteor=False)
    nltk = nltk_corpus_bleu(refs, hyps)
    # Both choose the closest reference length (ties to the shorter one), clip n-gram counts by the
    # maximum reference count, and use BP = exp(1 - r/c) on corpus totals. pycocoevalcap only adds 1e-15
    # to each corpus numerator and 1e-9 to each denominator (n-gram guesses, reference length); with
    # thousands of n-grams that shifts every factor by ~1e-9 / 3000, i.e. relative 1e-13: measured
    # |diff| ~1e-11 on the x100 scale for these 300 images. 1e-6 leaves room for summation order only.
    for metric in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert coco[metric] == pytest.approx(nltk[metric], abs=1e-6), metric
    assert 15 < coco["BLEU-4"] < 35  # human vs human captions on Flickr8k: a sanity range


def test_mismatched_keys_name_the_count():
    with pytest.raises(CaptionerError, match="differ on 2 images"):
        score_captions({1: ["a"], 2: ["b"]}, {1: "a", 3: "c"}, meteor=False)
    with pytest.raises(CaptionerError, match="no reference"):
        score_captions({1: []}, {1: "a"}, meteor=False)


def test_format_table_aligns():
    table = format_table({"BLEU-1": 65.8, "BLEU-2": 47.4, "BLEU-3": 33.9, "BLEU-4": 23.9, "METEOR": 26.0,
                          "ROUGE-L": 51.2, "CIDEr": 86.9}, 300)
    lines = table.splitlines()
    assert "300 images" in lines[0] and len(lines) == 8
    assert len({line.index(".") for line in lines[1:]}) == 1  # decimal points in one column
