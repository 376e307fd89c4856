"""Fluency counts: bad endings by word class, back-to-back repeats, distinct captions per image."""

import pytest

from captioner.eval.fluency import (ADJECTIVES, CLOSED_CLASS, bad_ending, fluency_counts, format_fluency,
                                    predicative_flags, repeated_word)


@pytest.mark.parametrize("caption, kind", [
    ("a little boy is playing with a blue", "adjective"),          # the shipped model's dev example
    ("a man is sitting on a red red red red", "adjective"),        # and its COCO ones
    ("a dog runs through the", "determiner"),
    ("a man in a red shirt is standing in", "preposition"),
    ("a dog jumps over a log and", "conjunction"),
    ("a black and white", "adjective"),
    ("A dog runs through the tall .", "adjective"),                 # case and punctuation do not hide it
    ("a dog runs on the grass", None),
    ("the dog is wet", None),                                       # predicative adjectives are complete
    ("two dogs are black and white", None),
    ("a girl dressed in pink", None),
    ("a boy looks up", None),                                       # particles may end a sentence
    ("two dogs chase each other", None),
    ("a man is hugging her", None),
    ("", None),
])
def test_bad_endings(caption, kind):
    assert bad_ending(caption) == kind


def test_bad_ending_takes_word_lists_too():
    assert bad_ending(["a", "man", "on", "a"]) == "determiner"
    assert predicative_flags("the dog is black and white".split()) == [False, False, True, True, True, True]


def test_repeats_are_back_to_back_only():
    assert repeated_word("a woman in a blue is is standing in a street") == "is"
    assert repeated_word("a man is sitting on a red red red red") == "red"
    assert repeated_word("a man and a dog and a cat") is None  # repeated, but not back to back


def test_word_classes_do_not_overlap_and_are_lowercase():
    assert not (CLOSED_CLASS & ADJECTIVES)
    assert all(w == w.lower() and " " not in w for w in CLOSED_CLASS | ADJECTIVES)


def test_counts_and_the_printed_line():
    captions = ["a dog runs on the grass", "a dog runs on the grass", "a man is sitting on a red red",
                "a woman in a blue is is standing in", "a dog runs through the"]
    counts = fluency_counts(captions)
    assert counts["images"] == 5 and counts["bad_endings"] == 3 and counts["repeats"] == 2
    assert counts["bad_endings_by_kind"] == {"determiner": 1, "preposition": 1, "conjunction": 0, "adjective": 1}
    assert counts["distinct"] == 4 and counts["distinct_per_image"] == pytest.approx(0.8)
    line = format_fluency(counts)
    assert "bad endings 3 (60.0%" in line and "repeated words 2 (40.0%)" in line and "4 / 5 = 0.800" in line
    assert "\n" not in line
    assert fluency_counts([])["distinct_per_image"] == 0.0
