"""Tags: what the encoder's own ImageNet classifier sees in an image, as caption words.

The encoder was trained to name 1,000 ImageNet classes, far more kinds of things than a caption dataset
like Flickr8k covers. Its classifier runs on the mean-pooled feature v that captioning already computes
(and the feature cache already holds), so the tags cost one (1280 x 1000) product per image:

    words = tag_words()                               # the distinct caption words the table maps to
    probs = word_probabilities(encoder, v)            # (B, len(words)): summed over each word's classes
    tags(encoder, v)                                  # [[Tag("broccoli", 0.83), ...], ...]

`imagenet_words.tsv` beside this file is the table, made and reviewed by hand: each ImageNet class, its
name as torchvision spells it, and the word a person would use for it in a caption, or nothing (every dog
breed is "dog", "tabby" is "cat", "mountain bike" is "bicycle", "seashore" is "beach"; "abacus" and
"chiton" map to nothing). A word's probability is the sum over its classes, so 118 breeds of dog add up
to one "dog".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import torch

from captioner.errors import CaptionerError

if TYPE_CHECKING:
    from captioner.vision.encoders import Encoder

TABLE = "imagenet_words.tsv"
N_CLASSES = 1000


@dataclass(frozen=True)
class Tag:
    word: str
    probability: float


@functools.cache
def imagenet_table() -> tuple[tuple[str, str], ...]:
    """(ImageNet class name, caption word or "") for the 1,000 classes, in class-index order."""
    rows = []
    text = resources.files("captioner.vision").joinpath(TABLE).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] != str(len(rows)):
            raise CaptionerError(f"{TABLE} line {n}: expected 'index<TAB>class name<TAB>word' for class "
                                 f"{len(rows)}, got {line!r}")
        rows.append((fields[1], fields[2].strip()))
    if len(rows) != N_CLASSES:
        raise CaptionerError(f"{TABLE}: {len(rows)} classes, expected {N_CLASSES}")
    return tuple(rows)


@functools.cache
def tag_words() -> tuple[str, ...]:
    """The distinct caption words of the table, sorted."""
    return tuple(sorted({word for _, word in imagenet_table() if word}))


@functools.cache
def _class_to_word() -> torch.Tensor:
    """(1000, len(tag_words())) 0/1: class i maps to word j."""
    index = {w: j for j, w in enumerate(tag_words())}
    m = torch.zeros(N_CLASSES, len(index))
    for i, (_, word) in enumerate(imagenet_table()):
        if word:
            m[i, index[word]] = 1.0
    return m


def class_probabilities(encoder: Encoder, v: torch.Tensor) -> torch.Tensor:
    """(B, feature_dim) v -> (B, 1000) ImageNet class probabilities from the encoder's classifier.

    The classifier was trained on the mean-pooled grid, which is where v starts (with `meanmax` pooling
    the max follows, with tags the tag probabilities); `max` pooling alone keeps no mean to give it."""
    if encoder.classifier is None:
        raise CaptionerError(f"encoder {encoder.spec.name} has no ImageNet classifier to tag images with")
    if encoder.spec.pooling == "max":
        raise CaptionerError("tags need the mean-pooled feature; encoder pooling is 'max'")
    weight = encoder.classifier.weight
    v = v[..., : weight.shape[1]]
    with torch.no_grad():
        logits = encoder.classifier(v.to(device=weight.device, dtype=weight.dtype))
    return logits.float().softmax(dim=-1)


def word_probabilities(encoder: Encoder, v: torch.Tensor) -> torch.Tensor:
    """(B, feature_dim) v -> (B, len(tag_words())): each word's probability, summed over its classes."""
    probs = class_probabilities(encoder, v)
    return probs @ _class_to_word().to(probs.device)


def word_rows(encoder: Encoder) -> torch.Tensor:
    """(len(tag_words()), D): each tag word's direction in the classifier's weight space, the mean of its
    classes' weight rows (how alike two words' objects look to the classifier)."""
    if encoder.classifier is None:
        raise CaptionerError(f"encoder {encoder.spec.name} has no ImageNet classifier to tag images with")
    m = _class_to_word()
    weight = encoder.classifier.weight.detach().float().cpu()
    return (m.T @ weight) / m.sum(dim=0)[:, None]


def tags(encoder: Encoder, v: torch.Tensor, threshold: float = 0.2, most: int = 5) -> list[list[Tag]]:
    """Each image's tag words with probability >= threshold, most likely first, at most `most`."""
    probs = word_probabilities(encoder, v)
    words = tag_words()
    top = probs.topk(min(most, probs.shape[-1]), dim=-1)
    return [[Tag(words[j], float(p)) for p, j in zip(ps.tolist(), js.tolist()) if p >= threshold]
            for ps, js in zip(top.values, top.indices)]
