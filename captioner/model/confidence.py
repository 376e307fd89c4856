"""How sure a caption is: logistic models on what the neighbour index, the decoder and the encoder know.

    calibration = Calibration.fit(features, good)        # features (n, 4), good (n,) 0/1
    calibration(features)                                # -> (n,) probabilities in [0, 1]
    confidence = Confidence(calibration, photo, power)   # photo: a Calibration over PHOTO_FEATURES, or None
    confidence(features, photo_features_of(nearest, mean, tag_probs))   # -> quality * familiar ** power

The features of a caption (FEATURES): how similar the nearest training image is to the photo, the mean
similarity of the k nearest, the caption's consensus with their captions (captioner.model.consensus), and
its log-probability per word (+ <end>). Each is standardised with the mean and spread it had where the
model was fitted, and the confidence is sigmoid(w . z + b). The few numbers are stored with the neighbour
index (`NeighbourIndex.calibration`), so a confidence always goes with the index it was fitted for.

A caption's quality model alone ranks captions well but barely knows when the photo is unlike anything the
model was trained on, so the confidence may carry a second model, `photo`: the probability that the photo
is one like the training photos, from its two similarities and the log of its tag probabilities
(captioner.vision.tags: the encoder's own ImageNet classifier, as caption words). It is fitted to tell the
training set's dev photos from photos of another set, and the confidence is quality * photo ** power.
An index whose calibration has no photo model (or one for other tag words) gives the quality alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.vision.tags import tag_words

FEATURES = ("nearest_similarity", "mean_similarity", "consensus", "log_prob_per_word")
TAG_FLOOR = 1e-3  # a tag word's probability is floored here before its log


def photo_feature_names() -> tuple[str, ...]:
    """The photo model's features: the two similarities, then "tag:WORD" for each tag word."""
    return ("nearest_similarity", "mean_similarity") + tuple(f"tag:{w}" for w in tag_words())


def photo_features_of(nearest: np.ndarray, mean: np.ndarray, tag_probs: np.ndarray) -> np.ndarray:
    """(n,), (n,), (n, len(tag_words())) -> (n, len(photo_feature_names()))."""
    logs = np.log(np.asarray(tag_probs, dtype=np.float64) + TAG_FLOOR)
    return np.column_stack([np.asarray(nearest, dtype=np.float64), np.asarray(mean, dtype=np.float64), logs])


def features_of(nearest: float, mean: float, consensus: float, log_prob_per_word: float) -> np.ndarray:
    return np.array([nearest, mean, consensus, log_prob_per_word], dtype=np.float64)


@dataclass(frozen=True)
class Calibration:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    fitted_on: str = ""  # what it was fitted on, in words
    features: tuple[str, ...] = FEATURES  # what each weight is for

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(n, len(FEATURES)) or (len(FEATURES),) -> confidences in [0, 1]."""
        z = (np.asarray(features, dtype=np.float64) - np.array(self.mean)) / np.array(self.std)
        return 1.0 / (1.0 + np.exp(-(z @ np.array(self.weights) + self.bias)))

    @classmethod
    def fit(cls, features: np.ndarray, good: np.ndarray, l2: float = 1e-2, fitted_on: str = "",
            steps: int = 50, names: tuple[str, ...] = FEATURES) -> Calibration:
        """L2-regularised logistic regression by Newton's method (a handful of features: exact and fast)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(good, dtype=np.float64)
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 0, std, 1.0)
        z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        reg = np.full(z.shape[1], l2 * len(x))
        reg[-1] = 0.0  # the bias is not shrunk
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-(z @ w)))
            grad = z.T @ (p - y) + reg * w
            hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(tuple(mean.tolist()), tuple(std.tolist()), tuple(w[:-1].tolist()), float(w[-1]), fitted_on,
                   tuple(names))

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": list(self.mean), "std": list(self.std),
                "weights": list(self.weights), "bias": self.bias, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], names: tuple[str, ...] = FEATURES) -> Calibration | None:
        """None when the stored coefficients are for other features (`names`) than this version computes."""
        if list(raw.get("features", [])) != list(names) or len(raw.get("weights", [])) != len(names):
            return None
        return cls(tuple(raw["mean"]), tuple(raw["std"]), tuple(raw["weights"]), float(raw["bias"]),
                   str(raw.get("fitted_on", "")), tuple(names))


@dataclass(frozen=True)
class Confidence:
    """quality(features) * photo(photo_features) ** power; with no photo model, quality alone."""

    quality: Calibration
    photo: Calibration | None = None
    power: float = 1.0

    def __call__(self, features: np.ndarray, photo_features: np.ndarray | None = None) -> np.ndarray:
        """features (n, 4) or (4,); photo_features (n, P) or (P,), needed when there is a photo model."""
        quality = self.quality(features)
        if self.photo is None:
            return quality
        if photo_features is None:
            raise ValueError("this confidence has a photo model: pass the photo's features")
        return quality * self.photo(photo_features) ** self.power

    def to_dict(self) -> dict[str, Any]:
        """The quality model's dict (as an index without a photo model stores it), with "photo" added."""
        out = self.quality.to_dict()
        if self.photo is not None:
            out["photo"] = {**self.photo.to_dict(), "power": self.power}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Confidence | None:
        """None when the quality model is for other features; a photo model for other tag words is left out."""
        quality = Calibration.from_dict(raw)
        if quality is None:
            return None
        photo = raw.get("photo")
        model = Calibration.from_dict(photo, photo_feature_names()) if isinstance(photo, dict) else None
        return cls(quality, model, float(photo.get("power", 1.0)) if model is not None else 1.0)
