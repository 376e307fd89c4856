"""Every run's neighbour index: its training images' vectors and captions, written once into the run
directory (`neighbours.knn`, captioner.model.neighbours), so that a model a user trains reranks and
explains its captions with its own training data, as the shipped one does with Flickr8k's."""

from __future__ import annotations

import logging
from pathlib import Path

from captioner.model.neighbours import FOLDER_FILE, index_of_records

log = logging.getLogger("captioner")


def write_run_index(run_dir: Path, data) -> Path | None:
    """Build RUN_DIR/neighbours.knn from `data` (captioner.train.sources.Prepared) unless it is there.

    A run that fine-tunes the encoder gets none: its image vectors change as it trains, so no fixed set of
    vectors would match the model it ends with."""
    out = Path(run_dir) / FOLDER_FILE
    if out.is_file():
        return out
    if data.features.encoder is not None:
        log.info("no neighbour index for this run: its encoder is fine-tuned, so the training images' vectors "
                 "change as it trains")
        return None
    rows = data.features.rows(data.train)
    index = index_of_records(data.train, data.features.train_array()[rows], data.features.spec().to_dict())
    index.save(out)
    log.info("neighbour index of the %d training images: %s (%.1f MB)", len(index), out, out.stat().st_size / 1e6)
    return out
