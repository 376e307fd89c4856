"""What `caption` adds from the model's neighbour index: the confidence mark (--min-confidence) and the
nearest training images' captions (--neighbours), as text lines, JSON fields and gallery fields."""

from __future__ import annotations

from captioner.errors import CaptionerError


class Explainer:
    def __init__(self, captioner, neighbours: int, min_confidence: float | None, rerank):
        if neighbours < 0:
            raise CaptionerError(f"--neighbours must be 0 or more, got {neighbours}")
        if min_confidence is not None and not 0 <= min_confidence <= 1:
            raise CaptionerError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
        judged = captioner.judged
        if (neighbours or min_confidence is not None) and judged is None:
            raise CaptionerError("--neighbours and --min-confidence need the model's neighbour index (MODEL.knn "
                                 "or neighbours.knn beside the checkpoint, written by `captioner train`)")
        if min_confidence is not None and judged.calibration is None:
            raise CaptionerError("--min-confidence: this model's neighbour index carries no confidence "
                                 "calibration")
        if neighbours > rerank.k:
            raise CaptionerError(f"--neighbours ({neighbours}) cannot exceed --rerank-k ({rerank.k})")
        self.judged, self.neighbours, self.min_confidence = judged, neighbours, min_confidence
        self.flagged = 0  # captions marked as under --min-confidence

    def low(self, h) -> bool:
        return self.min_confidence is not None and h.confidence is not None and h.confidence < self.min_confidence

    def mark(self, h) -> str:
        """'? ' before a caption under --min-confidence (counted once per image's best caption)."""
        return "? " if self.low(h) else ""

    def fields(self, best) -> dict:
        """The JSON fields of an image's best caption: confidence, low_confidence, neighbours."""
        out: dict = {}
        if best.confidence is not None:
            out["confidence"] = round(best.confidence, 4)
        if self.min_confidence is not None:
            out["low_confidence"] = self.low(best)
        self.flagged += self.low(best)
        if self.neighbours:
            out["neighbours"] = self.judged.neighbour_captions(best, self.neighbours)
        return out

    def lines(self, best) -> list[str]:
        """Text lines after an image's caption: its confidence (with --min-confidence) and neighbours."""
        self.flagged += self.low(best)
        out = []
        if self.min_confidence is not None and best.confidence is not None:
            out.append(f"confidence\t{best.confidence:.2f}")
        for n in (self.judged.neighbour_captions(best, self.neighbours) if self.neighbours else []):
            out.append(f"neighbour\t{n['similarity']:.2f}\t{n['image']}\t{' / '.join(n['captions'])}")
        return out

    def gallery(self, best) -> dict:
        """GalleryItem's confidence, neighbours and the tags the caption says."""
        near = self.judged.neighbour_captions(best, self.neighbours) if self.neighbours else []
        return {"confidence": best.confidence, "neighbours": [(n["image"], n["captions"]) for n in near],
                "tags": best.tags or ()}
