"""How sure a caption is: a logistic model on what the neighbour index and the decoder know.

    calibration = Calibration.fit(features, good)        # features (n, 4), good (n,) 0/1
    calibration(features)                                # -> (n,) confidences in [0, 1]

The features of a caption (FEATURES): how similar the nearest training image is to the photo, the mean
similarity of the k nearest, the caption's consensus with their captions (captioner.model.consensus), and
its log-probability per word (+ <end>). Each is standardised with the mean and spread it had where the
model was fitted, and the confidence is sigmoid(w . z + b). The few numbers are stored with the neighbour
index (`NeighbourIndex.calibration`), so a confidence always goes with the index it was fitted for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES = ("nearest_similarity", "mean_similarity", "consensus", "log_prob_per_word")


def features_of(nearest: float, mean: float, consensus: float, log_prob_per_word: float) -> np.ndarray:
    return np.array([nearest, mean, consensus, log_prob_per_word], dtype=np.float64)


@dataclass(frozen=True)
class Calibration:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    fitted_on: str = ""  # what it was fitted on, in words

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(n, len(FEATURES)) or (len(FEATURES),) -> confidences in [0, 1]."""
        z = (np.asarray(features, dtype=np.float64) - np.array(self.mean)) / np.array(self.std)
        return 1.0 / (1.0 + np.exp(-(z @ np.array(self.weights) + self.bias)))

    @classmethod
    def fit(cls, features: np.ndarray, good: np.ndarray, l2: float = 1e-2, fitted_on: str = "",
            steps: int = 50) -> Calibration:
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
        return cls(tuple(mean.tolist()), tuple(std.tolist()), tuple(w[:-1].tolist()), float(w[-1]), fitted_on)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "mean": list(self.mean), "std": list(self.std),
                "weights": list(self.weights), "bias": self.bias, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration | None:
        """None when the stored coefficients are for other features than this version computes."""
        if list(raw.get("features", [])) != list(FEATURES):
            return None
        return cls(tuple(raw["mean"]), tuple(raw["std"]), tuple(raw["weights"]), float(raw["bias"]),
                   str(raw.get("fitted_on", "")))
