"""Object hallucination (CHAIR): which objects a caption names, and which of them no reference names."""

import pytest

from captioner.eval.hallucination import (NAMES, OBJECTS, format_hallucination, hallucinated, mentions,
                                          object_hallucination)


def test_plurals_and_synonyms_fold_into_one_object():
    assert mentions("two puppies and a dog") == {"dog"}
    assert mentions("a man rides his bike past the bicycles") == {"person", "bicycle"}
    assert mentions("kids swim in the lake near the ocean") == {"person", "water"}
    assert mentions("women and children") == {"person"}
    assert mentions("three benches by the buses") == {"bench", "bus"}


def test_two_word_names_take_their_words():
    assert mentions("a teddy bear on a bed") == {"teddy bear", "bed"}
    assert mentions("a hot dog with mustard") == {"hot dog"}
    assert mentions("a bear eats a hot dog") == {"bear", "hot dog"}
    assert mentions("a dirt bike in the mud") == {"motorcycle"}


def test_ambiguous_words_are_not_objects():
    assert mentions("a man in glasses waves") == {"person"}
    assert mentions("an orange cat") == {"cat"}
    assert mentions("a couple of dogs") == {"dog"}


def test_no_name_stands_for_two_objects():
    assert len(NAMES) > len(OBJECTS)
    for name, obj in NAMES.items():
        assert obj in OBJECTS and name == name.lower()


def test_a_mention_is_hallucinated_when_no_reference_names_it():
    refs = ["a plate of broccoli on a table", "food on a desk"]
    assert hallucinated("a dog sitting at a table", refs) == {"dog"}
    assert hallucinated("broccoli on a desk", refs) == set()
    # a synonym in a reference counts: "puppies" supports "dog"
    assert hallucinated("a dog in the grass", ["two puppies on a lawn"]) == set()


def test_chair_i_and_chair_s_count_mentions_and_captions():
    captions = {"a": "a dog on a table", "b": "a cat on a bed", "c": "a man in the water"}
    refs = {"a": ["broccoli on a table"], "b": ["a kitten sleeping on a bed"], "c": ["a boy at the beach"]}
    counts = object_hallucination(captions, refs)
    # mentions: a {dog, table}, b {cat, bed}, c {person, water}; hallucinated: dog, water
    assert counts["mentions"] == 6 and counts["hallucinated"] == 2
    assert counts["chair_i"] == pytest.approx(2 / 6)
    assert counts["chair_s"] == pytest.approx(2 / 3)
    assert counts["objects"]["dog"] == {"said": 1, "wrong": 1}
    assert counts["objects"]["cat"] == {"said": 1, "wrong": 0}
    assert counts["per_image"] == {"a": ["dog"], "b": [], "c": ["water"]}
    text = format_hallucination(counts)
    assert "CHAIR-i 33.3%" in text and "CHAIR-s 66.7%" in text and "dog 1 of 1" in text


def test_nothing_named_is_no_hallucination():
    counts = object_hallucination({"a": "something happens here"}, {"a": ["it is"]})
    assert counts["chair_i"] == 0.0 and counts["chair_s"] == 0.0 and counts["mentions"] == 0
