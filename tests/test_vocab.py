"""Tokenizer and vocabulary: what a caption becomes, and back; the stored form survives a round trip."""

import json
import random

import pytest
import torch

from captioner.data.records import load_records
from captioner.data.vocab import END, PAD, START, UNK, Vocabulary, tokenize
from captioner.errors import CaptionerError


@pytest.mark.parametrize("text, tokens", [
    ("A child in a pink dress climbs up a set of stairs .", "a child in a pink dress climbs up a set of stairs"),
    ("Two dogs, one black; one WHITE!", "two dogs one black one white"),
    ("A man in a t-shirt doesn't smile .", "a man in a t-shirt doesn't smile"),
    ("The dog's ball", "the dog's ball"),
    ("A boy wearing a \u2018red\u2019 shirt's sleeve", "a boy wearing a red shirt's sleeve"),
    ("3 people , 2.5 meters and 1,000 birds on 42nd street", "3 people 2.5 meters and 1,000 birds on 42nd street"),
    ('"Quoted" -- dashes - and (brackets)', "quoted dashes and brackets"),
    ("Un café à Paris", "un café à paris"),
    ("", ""),
    (" . , ! ", ""),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == (tokens.split() if tokens else [])


CAPTIONS = ["A dog runs .", "A dog jumps .", "The dog runs fast .", "A cat sits .", "A zebra ."]


def test_build_order_and_min_count():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # Specials first, then count descending, ties alphabetical; "cat", "fast", "zebra" seen once.
    assert vocab.words == (PAD, START, END, UNK, "a", "dog", "runs")
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 7 and "dog" in vocab and "cat" not in vocab and UNK in vocab
    assert vocab.encode("A cat runs") == [1, vocab.index("a"), vocab.unk_id, vocab.index("runs"), 2]
    assert len(Vocabulary.build(CAPTIONS, min_count=1)) == 4 + 9
    with pytest.raises(CaptionerError, match="min_count"):
        Vocabulary.build(CAPTIONS, min_count=0)


def test_build_is_independent_of_caption_order():
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)
    assert Vocabulary.build(shuffled, min_count=1) == Vocabulary.build(CAPTIONS, min_count=1)


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    text = "The dog runs, a cat sits!"
    ids = vocab.encode(text)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and vocab.unk_id not in ids
    assert vocab.decode(ids) == "the dog runs a cat sits"
    assert vocab.decode(vocab.encode("a unicorn")) == f"a {UNK}"


def test_encode_max_len_cuts_words_not_end():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    ids = vocab.encode("a dog runs fast", max_len=2)
    assert ids == [vocab.start_id, vocab.index("a"), vocab.index("dog"), vocab.end_id]
    assert vocab.encode("a dog", max_len=10) == vocab.encode("a dog")
    assert vocab.encode("a dog", max_len=0) == [vocab.start_id, vocab.end_id]


def test_decode_stops_at_end_and_skips_start_and_pad():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    a, dog = vocab.index("a"), vocab.index("dog")
    assert vocab.decode([1, a, 0, dog, 2, a, a]) == "a dog"
    assert vocab.decode(torch.tensor([a, dog, 2, 0, 0])) == "a dog"
    assert vocab.decode([]) == ""


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(CAPTIONS + ["Un café"], min_count=1)
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.encode("un café") == vocab.encode("un café")
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("garbage, message", [
    ([1, 2, 3], "not a captioner vocabulary"),
    ({"words": [PAD, START, END, UNK]}, "not a captioner vocabulary"),
    ({"format": "captioner-vocabulary", "version": 99, "words": []}, "version 99"),
    ({"format": "captioner-vocabulary", "version": 1, "words": "abc"}, "list of strings"),
    ({"format": "captioner-vocabulary", "version": 1, "words": [PAD, START, END, UNK, 5]}, "list of strings"),
    ({"format": "captioner-vocabulary", "version": 1, "words": ["a", PAD, START, END, UNK]}, "must start with"),
    ({"format": "captioner-vocabulary", "version": 1, "words": [PAD, START, END, UNK, "a", "a"]}, "'a' twice"),
    ({"format": "captioner-vocabulary", "version": 1, "words": [PAD, START, END, UNK, ""]}, "empty word"),
])
def test_from_dict_rejects_garbage(garbage, message):
    with pytest.raises(CaptionerError, match=message):
        Vocabulary.from_dict(garbage)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "vocab.json"
    with pytest.raises(CaptionerError, match=f"{path}: vocabulary file not found"):
        Vocabulary.load(path)
    path.write_text('{"format": "captioner-vocab')
    with pytest.raises(CaptionerError, match=f"{path}: not a vocabulary JSON"):
        Vocabulary.load(path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(CaptionerError, match=f"{path}: not a captioner vocabulary"):
        Vocabulary.load(path)


@pytest.mark.realdata
def test_real_flickr8k_vocabulary_size(flickr8k_root):
    train = load_records(flickr8k_root, splits=["train"])
    vocab = Vocabulary.build((c for r in train for c in r.captions), min_count=5)
    print(f"Flickr8k train vocabulary, min_count 5: {len(vocab)} entries (4 specials included)")
    assert 2000 <= len(vocab) <= 3500
    # Punctuation never becomes a word; the commonest words do.
    assert "." not in vocab and "," not in vocab
    assert {"a", "dog", "man", "in", "the"} <= set(vocab.words)


def test_a_vocabulary_larger_than_captions_have_is_named(caplog):
    rng = random.Random(0)
    captions = [f"a {colour} square fills the picture" for colour in ("red", "green", "blue")] * 50
    with caplog.at_level("WARNING", logger="captioner"):
        Vocabulary.build(captions, min_count=1)
    assert caplog.text == ""  # real captions: quiet
    # Text that is not captions (ids, hashes, a document): 50 rows of 100 words never seen twice.
    junk = [" ".join("".join(rng.choices("abcdefghij", k=12)) for _ in range(100)) for _ in range(50)]
    with caplog.at_level("WARNING", logger="captioner"):
        vocab = Vocabulary.build(captions + junk, min_count=1)
    [message] = [r.getMessage() for r in caplog.records]
    assert message == (f"vocabulary of {len(vocab) - 4} words from 5900 words of captions: more than captions that "
                       "size have (at most ~3072); is some text not a caption? (most words of its own: "
                       f"'{' '.join(junk[0].split()[:8])} ...')")
