"""Open vocabulary: the encoder's tags mixed into the next-word distribution (copy), required by constrained
search, and words beyond the caption vocabulary fed back through their proxies."""

import pytest
import torch

from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.errors import CaptionerError
from captioner.model.open_vocab import OpenVocab, OpenVocabulary, TagVocabulary, constrained_beam_search
from captioner.model.search import beam_search

WORDS = ("a", "dog", "cat", "runs", "horse")
TAGS = ("cat", "dog", "horse", "zebra", "broccoli")  # zebra and broccoli: not in the vocabulary


def vocab():
    return Vocabulary(SPECIALS + WORDS)


def rows():
    # zebra looks like a horse, broccoli like a cat (to this made-up classifier)
    return torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.1, 0, 0.9], [0.8, 0.3, 0]])


class Fixed:
    """A decoder whose next-word log-probabilities are a fixed table of the previous word; it records what
    it was fed."""

    feature_dim = 2

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.fed = []

    def init_state(self, features):
        return (torch.zeros(features.shape[0], 1),)

    def step(self, tokens, state):
        self.fed.append(tokens.clone())
        return self.table[tokens].log(), state

    def select_state(self, state, index):
        return tuple(t[index] for t in state)


def test_the_extended_vocabulary_keeps_ids_and_finds_proxies():
    tags = TagVocabulary(vocab(), TAGS, rows())
    v = vocab()
    assert tags.words.words[:len(v)] == v.words  # the caption vocabulary's ids are unchanged
    assert tags.new_words == ("zebra", "broccoli")
    assert tags.proxy_word("zebra") == "horse" and tags.proxy_word("broccoli") == "cat"
    assert tags.proxy_word("dog") == "dog"
    zebra = tags.words.ids["zebra"]
    assert tags.inputs(torch.tensor([zebra, v.ids["dog"]])).tolist() == [v.ids["horse"], v.ids["dog"]]


def test_no_tag_word_in_the_vocabulary_is_an_error():
    with pytest.raises(CaptionerError, match="none of the tag words"):
        TagVocabulary(Vocabulary(SPECIALS + ("a",)), TAGS, rows())


def uniform_table(n):
    return torch.full((n, n), 1.0 / n)


def test_copy_moves_the_object_mass_to_the_photos_tags_and_keeps_a_distribution():
    v = vocab()
    tags = TagVocabulary(v, TAGS, rows())
    table = torch.full((len(v), len(v)), 0.01)
    table[:, v.ids["dog"]] = 0.6  # the decoder wants to say "dog"
    table = table / table.sum(dim=1, keepdim=True)
    q = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.9]])  # the photo shows broccoli
    wrapped = OpenVocabulary(Fixed(table), tags, q, OpenVocab(copy=0.5, must=0.0, floor=0.0), v.end_id)
    state = wrapped.init_state(torch.zeros(1, 2))
    log_probs, _ = wrapped.step(torch.tensor([v.start_id]), state)
    p = log_probs.exp()[0]
    assert p.shape[0] == len(tags.words)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    broccoli, dog = tags.words.ids["broccoli"], v.ids["dog"]
    assert float(p[dog]) == pytest.approx(0.5 * float(table[v.start_id, dog]), rel=1e-4)
    assert float(p[broccoli]) > 0.25  # half of the object mass, all on the one tag the photo shows
    assert float(p[v.ids["runs"]]) == pytest.approx(float(table[v.start_id, v.ids["runs"]]), rel=1e-4)

    off = OpenVocabulary(Fixed(table), tags, q, OpenVocab.off(), v.end_id)
    p_off = off.step(torch.tensor([v.start_id]), off.init_state(torch.zeros(1, 2)))[0].exp()[0]
    assert torch.allclose(p_off[:len(v)], table[v.start_id], atol=1e-6)
    assert float(p_off[len(v):].sum()) == 0.0  # no new word without the tags


def test_constrained_search_says_the_confident_tag_and_feeds_its_proxy():
    v = vocab()
    tags = TagVocabulary(v, TAGS, rows())
    table = torch.full((len(v), len(v)), 0.02)
    table[:, v.end_id] = 0.5  # the decoder would rather stop at once
    table[v.start_id, v.end_id] = 0.02
    table[v.start_id, v.ids["a"]] = 0.8
    table[:, [v.pad_id, v.start_id, v.unk_id]] = 1e-6
    table = table / table.sum(dim=1, keepdim=True)
    q = torch.tensor([[0.0, 0.0, 0.0, 0.95, 0.0]])  # a zebra
    model = Fixed(table)
    wrapped = OpenVocabulary(model, tags, q, OpenVocab(copy=0.3, must=0.5, floor=0.0), v.end_id)
    must = wrapped.required()
    assert must.tolist() == [tags.words.ids["zebra"]]
    found = constrained_beam_search(wrapped, torch.zeros(1, 2), must, beam_size=3, max_len=6,
                                    start_id=v.start_id, end_id=v.end_id)
    words = tags.words.decode(found[0][0].tokens).split()
    assert "zebra" in words
    fed = torch.cat(model.fed).tolist()
    assert tags.words.ids["zebra"] not in fed and v.ids["horse"] in fed  # the decoder read its proxy

    unconstrained = beam_search(OpenVocabulary(Fixed(table), tags, q, OpenVocab(copy=0.3, must=0.0, floor=0.0), v.end_id),
                                torch.zeros(1, 2), beam_size=3, max_len=6, start_id=v.start_id,
                                end_id=v.end_id)
    assert "zebra" not in tags.words.decode(unconstrained[0][0].tokens).split()


def test_settings_are_checked():
    with pytest.raises(CaptionerError, match="copy weight"):
        OpenVocab(copy=1.5)
    with pytest.raises(CaptionerError, match="tag probability"):
        OpenVocab(must=-0.1)
    with pytest.raises(CaptionerError, match="tag floor"):
        OpenVocab(floor=1.0)
    assert not OpenVocab.off().on and OpenVocab().on
    assert not OpenVocab(copy=0.0, must=0.0, floor=0.0).on


def test_the_shipped_model_names_a_new_word_and_says_which_tags_it_used():
    from captioner.inference import Captioner
    from captioner.vision.tags import imagenet_table

    cap = Captioner.from_pretrained("flickr8k", device="cpu", precision="fp32")
    broccoli = [i for i, (name, _) in enumerate(imagenet_table()) if name == "broccoli"][0]
    weight = cap.encoder.classifier.weight.detach()
    v = (weight[broccoli] * 3.0).repeat(1, 1)[:, :cap.model.feature_dim]  # the classifier is sure: broccoli
    v = v.clamp_min(0)
    off = cap.caption_features(v, open_vocab=OpenVocab.off())[0][0]
    assert off.tags is None and "broccoli" not in cap.text(off)
    on = cap.caption_features(v, open_vocab=OpenVocab(must=0.5))[0][0]
    assert "broccoli" in cap.text(on).split()
    said = dict(on.tags)
    assert said["broccoli"] > 0.5
    assert cap.as_dict(on)["tags"][0]["word"] in cap.text(on).split()


def test_a_checked_word_the_photo_does_not_show_is_scaled_down():
    v = vocab()
    tags = TagVocabulary(v, TAGS, rows())
    table = torch.full((len(v), len(v)), 0.01)
    table[:, v.ids["dog"]] = 0.6
    table = table / table.sum(dim=1, keepdim=True)
    no_dog = torch.tensor([[0.3, 0.005, 0.0, 0.0, 0.0]])  # a cat, and hardly a dog
    dog = torch.tensor([[0.0, 0.9, 0.0, 0.0, 0.0]])
    settings = OpenVocab(copy=0.0, must=0.0, floor=0.05, checked=("dog",))

    def probs(q):
        wrapped = OpenVocabulary(Fixed(table), tags, q, settings, v.end_id)
        return wrapped.step(torch.tensor([v.start_id]), wrapped.init_state(torch.zeros(1, 2)))[0].exp()[0]

    p = probs(no_dog)
    before = table[v.start_id]
    assert float(p[v.ids["dog"]]) == pytest.approx(0.1 * float(before[v.ids["dog"]]), rel=1e-4)  # 0.005 / 0.05
    others = [i for i in range(len(v)) if i != v.ids["dog"]]
    assert torch.allclose(p[others], before[others], atol=1e-6)  # a penalty on "dog", nothing else moves
    assert torch.allclose(probs(dog)[:len(v)], before, atol=1e-6)  # the photo shows a dog: unchanged
