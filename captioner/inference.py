"""A trained captioner in use: checkpoint -> (encoder, decoder, vocabulary) -> captions.

`Captioner` is what caption.py and evaluate.py share: it rebuilds the model from a checkpoint (the
shipped default when none is named; several make an ensemble, see captioner.model.ensemble), checks that the
encoder it was trained on is the one it will be fed, and turns image vectors or image files into
captions with greedy or beam search.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from captioner import checkpoint
from captioner.device import resolve_device
from captioner.vision.encoders import Encoder, build_encoder
from captioner.errors import CaptionerError
from captioner.vision.images import as_image, load_image
from captioner.vision.tags import tag_words, word_probabilities, word_rows
from captioner.model.search import Hypothesis, beam_search, captioning_policy
from captioner.precision import Precision, resolve
from captioner.precision import default as default_precision
from captioner.choices import DEFAULT_PRECISION
from captioner.checkpoint import default_checkpoint, default_checkpoints  # noqa: F401 (re-exported)
from captioner.eval import fluency
from captioner.model.constraints import EndGuard, NoRepeatNgram, NoRepeatWord
from captioner.model.decoding import Decoding, Guards, Rerank  # noqa: F401 (Rerank re-exported)
from captioner.model.neighbours import NeighbourIndex, find_index
from captioner.model.open_vocab import OpenVocabulary, TagVocabulary, constrained_beam_search
from captioner.model.rerank import Judged, log_prob_per_word

log = logging.getLogger("captioner")


@dataclass
class Captioned:
    path: Path
    hypotheses: list[Hypothesis]  # n-best, best first
    caption: str  # the best one, as text


class Captioner:
    def __init__(self, loaded: checkpoint.LoadedModel, device: torch.device | None = None,
                 precision: Precision | None = None, index: NeighbourIndex | None = None):
        self.model = loaded.model
        self.vocab = loaded.vocab
        self.loaded = loaded  # keeps the stored encoder spec and any fine-tuned encoder weights
        self.device = device or torch.device("cpu")
        # The CNN's and the decoder's GEMMs run in this precision; beam scores stay fp32.
        self.precision = precision or default_precision(self.device)  # none named: auto, as the commands
        self.model.to(self.device).eval()
        self._encoder: Encoder | None = None
        self.searchable = captioning_policy(self.model, self.vocab)
        # The training images as a neighbour index (captioner.model.neighbours): consensus reranking, the
        # confidence and the nearest examples. None: the beam's order, and no confidence.
        self.judged = Judged(index) if index is not None else None

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: torch.device | None = None,
                        precision: Precision | None = None) -> Captioner:
        """One checkpoint file or shipped model's name; None: the shipped default (see from_checkpoints)."""
        return cls.from_checkpoints([path] if path is not None else [], device, precision)

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], device: torch.device | None = None,
                         precision: Precision | None = None) -> Captioner:
        """Checkpoint files or shipped models' names. One: that model. Several: an ensemble that averages
        their next-word probabilities; they must share vocabulary and image features. None: the shipped
        default, the ensemble of `checkpoint.DEFAULT_MODELS`."""
        files = checkpoint.pretrained_paths(paths)
        if len(files) == 1:
            loaded = checkpoint.load_model(files[0])
        else:
            loaded = checkpoint.ensemble_of([checkpoint.load_model(p) for p in files], files)
        return cls(loaded, device, precision, index=cls._index_for(loaded, files))

    @staticmethod
    def _index_for(loaded: checkpoint.LoadedModel, files: Sequence[Path]) -> NeighbourIndex | None:
        """The neighbour index beside the checkpoints (MODEL.knn or the folder's neighbours.knn), if any;
        one made with other image features than the model's is refused."""
        where = find_index(files)
        if where is None:
            return None
        index = NeighbourIndex.load(where)
        index.check_encoder(loaded.encoder, loaded.model.feature_dim, files[0], where)
        return index

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | Sequence[str | Path] | None = None,
                        device: str | torch.device = "auto", precision: str = DEFAULT_PRECISION) -> Captioner:
        """The shipped default (None), a shipped model's name ("flickr8k": the single GRU, the fastest), a
        checkpoint file from `captioner train`, or a list of those for an ensemble.

            cap = Captioner.from_pretrained()
            cap("photo.jpg")                  # -> "a dog runs through the grass"

        device: "auto" (a GPU when there is one), "cpu" or "cuda". precision: "auto" (bf16 where the hardware
        has native bf16, else fp32), "fp32" or "bf16" (captioner.precision).
        """
        where = resolve_device(device)
        if name_or_path is None:
            names: Sequence[str | Path] = []
        elif isinstance(name_or_path, (str, Path)):
            names = [name_or_path]
        else:
            names = list(name_or_path)
        return cls.from_checkpoints(names, where, resolve(precision, where))

    @property
    def encoder(self) -> Encoder:
        """Built on first use: evaluating from cached features never needs the CNN."""
        if self._encoder is None:
            try:  # a spec stored before a field existed means that field's default (plain features)
                stored = self.loaded.encoder_spec()
            except CaptionerError as err:
                raise CaptionerError(f"the checkpoint's {err}") from None
            encoder = build_encoder(stored.name, flip_average=stored.flip_average, pooling=stored.pooling,
                                    tags=stored.tags)
            if self.loaded.encoder_state is not None:  # trained with the encoder's last blocks: its own weights
                checkpoint.load_state(encoder, self.loaded.encoder_state, "checkpoint's encoder_state")
                encoder.freeze()
                encoder.spec = replace(encoder.spec, weights=stored.weights)
            differs = encoder.spec.differences(stored)
            if differs:
                raise CaptionerError(
                    f"the checkpoint was trained on {stored.name} features with other "
                    f"settings ({', '.join(differs)}) than this install's encoder provides")
            self._encoder = encoder.to(self.device).eval()
        return self._encoder

    @functools.cached_property
    def tag_vocab(self) -> TagVocabulary | None:
        """The caption vocabulary with the encoder's tag words (captioner.model.open_vocab); None when the
        encoder has no ImageNet classifier or no mean-pooled feature to give tags from."""
        try:  # an encoder this install cannot build, or one without a classifier: no tags
            if self.encoder.spec.pooling == "max":
                return None
            return TagVocabulary(self.vocab, tag_words(), word_rows(self.encoder))
        except CaptionerError:
            return None

    def constrained(self, guards: Guards, model=None):
        """The searchable decoder under the decode-time constraints of captioner.model.constraints."""
        model = self.searchable if model is None else model
        if guards.no_repeat_ngram:
            model = NoRepeatNgram(model, guards.no_repeat_ngram)
        if guards.repeat_word:
            model = NoRepeatWord(model)
        if guards.end:
            ids = lambda words: [self.vocab.ids[w] for w in words if w in self.vocab]  # noqa: E731
            model = EndGuard(model, self.vocab.end_id, ids(fluency.CLOSED_CLASS), ids(fluency.ADJECTIVES),
                             ids(fluency.PREDICATIVE), self.vocab.ids.get("and"))
        return model

    @torch.no_grad()
    def caption_features(self, features: torch.Tensor, decoding: Decoding | None = None, batch_size: int = 100,
                         **settings) -> list[list[Hypothesis]]:
        """features (N, F) image vectors -> the n-best hypotheses for each image.

        decoding (captioner.model.decoding.Decoding; default: Decoding()): the beam, its length and n-best,
        the length penalty, the fluency guards (the default, no bigram twice, no word twice in a row and
        no dangling ending, measured best on the shipped model; `Guards.off()`: plain beam search) and the
        consensus reranking: with a neighbour index, the beam is widened to rerank.beam and its
        rerank.n_best best are reranked by consensus with the nearest training images
        (captioner.model.rerank; `Rerank.off()`: the beam's order); every hypothesis then carries its
        consensus, confidence and the photo's neighbours; and the open vocabulary: the encoder's tags in the
        next-word distribution (captioner.model.open_vocab), so that a caption may name what the caption
        vocabulary lacks, each hypothesis then carrying the tags it says. `settings`: Decoding fields as
        keywords (beam_size=5), replacing those of `decoding`.
        """
        decoding = Decoding.of(decoding, **settings)
        open_vocab = decoding.open_vocab
        tag_vocab = self.tag_vocab if open_vocab.on else None
        if features.shape[-1] != self.model.feature_dim:
            raise CaptionerError(f"features have {features.shape[-1]} dimensions; the model expects "
                                 f"{self.model.feature_dim}")
        rerank, n_best = decoding.rerank, decoding.n_best
        search = decoding
        if self.judged is not None and rerank.n_best:
            search = replace(decoding, beam_size=max(decoding.beam_size, rerank.beam, rerank.n_best),
                             n_best=max(n_best, rerank.n_best))
        out: list[list[Hypothesis]] = []
        for i in range(0, len(features), batch_size):
            chunk = features[i:i + batch_size].to(self.device, torch.float32)
            searchable, tag_probs = self.searchable, None
            if tag_vocab is not None:
                tag_probs = word_probabilities(self.encoder, chunk)
                searchable = OpenVocabulary(searchable, tag_vocab, tag_probs, open_vocab, self.vocab.end_id)
            searchable = self.constrained(decoding.guards, searchable)
            with self.precision.autocast():
                found = beam_search(searchable, chunk, search, start_id=self.vocab.start_id,
                                    end_id=self.vocab.end_id)
                if tag_probs is not None and open_vocab.must > 0:
                    self._say_required(search, chunk, tag_probs, found)
            if self.judged is not None:
                found = self.judged(chunk, found, self._consensus_words, rerank,
                                    self._tag_probabilities(chunk) if tag_probs is None else tag_probs)
            if tag_probs is not None:
                for image_probs, hyps in zip(tag_probs.tolist(), found):
                    for h in hyps:
                        h.tags = self._caption_tags(h, image_probs)
            out.extend(h[:n_best] for h in found)
        return out

    def _tag_probabilities(self, features: torch.Tensor) -> torch.Tensor | None:
        """The photos' tag word probabilities, when the confidence's calibration has a photo model (it judges
        how like the training photos a photo is by them) and the encoder has its ImageNet classifier."""
        if self.judged is None or not self.judged.needs_tags:
            return None
        try:
            return word_probabilities(self.encoder, features)
        except CaptionerError:  # no classifier, or no mean-pooled feature: no confidence
            return None

    def _say_required(self, search: Decoding, features, tag_probs, found) -> None:
        """Replace, in place, the hypotheses of the images with a tag at least open_vocab.must probable that
        their best caption does not say by those of constrained search, which must say it (an image where
        it cannot fit, or, with open_vocab.margin, where saying it costs more than that margin in
        log-probability per word, keeps its own)."""
        open_vocab = search.open_vocab
        must = self.tag_vocab.required(tag_probs, open_vocab.must)
        for row, hyps in enumerate(found):  # a caption that already says its tag keeps its own search
            if int(must[row]) >= 0 and hyps and int(must[row]) in hyps[0].tokens:
                must[row] = -1
        rows = (must >= 0).nonzero().squeeze(1)
        if not len(rows):
            return
        picked = OpenVocabulary(self.searchable, self.tag_vocab, tag_probs[rows], open_vocab, self.vocab.end_id)
        said = constrained_beam_search(self.constrained(search.guards, picked), features[rows], must[rows],
                                       beam_size=search.beam_size, max_len=search.max_len, n_best=search.n_best,
                                       start_id=self.vocab.start_id, end_id=self.vocab.end_id)
        for row, hyps in zip(rows.tolist(), said):
            if hyps and (not open_vocab.margin or not found[row] or
                         log_prob_per_word(hyps[0]) >= log_prob_per_word(found[row][0]) - open_vocab.margin):
                found[row] = hyps

    def _consensus_words(self, hypothesis: Hypothesis) -> list[str]:
        """The caption's words as the neighbour index compares them: a word beyond the caption vocabulary
        counts as its proxy, since the training captions never have it."""
        words = self.text(hypothesis).split()
        if self.tag_vocab is None or not self.tag_vocab.new_words:
            return words
        return [self.tag_vocab.proxy_word(w) for w in words]

    def _caption_tags(self, hypothesis: Hypothesis, image_probs: list[float]) -> tuple[tuple[str, float], ...]:
        """The tag words the caption says, with the photo's probability for each."""
        column = self.tag_vocab.column
        said = dict.fromkeys(w for w in self.text(hypothesis).split() if w in column)
        return tuple((w, round(image_probs[column[w]], 4)) for w in said)

    def text(self, hypothesis: Hypothesis) -> str:
        """The caption's words; ids past the caption vocabulary are the open vocabulary's tag words."""
        if any(t >= len(self.vocab) for t in hypothesis.tokens) and self.tag_vocab is not None:
            return self.tag_vocab.words.decode(hypothesis.tokens)
        return self.vocab.decode(hypothesis.tokens)

    def as_dict(self, hypothesis: Hypothesis) -> dict:
        """{"caption", "score"}, and "consensus" and "confidence" when a neighbour index judged it."""
        out = {"caption": self.text(hypothesis), "score": round(float(hypothesis.score), 4)}
        if hypothesis.consensus is not None:
            out["consensus"] = round(hypothesis.consensus, 4)
        if hypothesis.confidence is not None:
            out["confidence"] = round(hypothesis.confidence, 4)
        if hypothesis.tags is not None:
            out["tags"] = [{"word": w, "probability": p} for w, p in hypothesis.tags]
        return out

    @torch.no_grad()
    def caption_images(self, paths: Sequence[Path], decoding: Decoding | None = None, batch_size: int = 16,
                       **settings):
        """Yield (path, Captioned) for each readable image and (path, CaptionerError) for each bad one,
        in the order given; one bad file never stops the others. decoding, settings: as caption_features."""
        decoding = Decoding.of(decoding, **settings)
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            images, ok, results = [], [], {}
            for path in chunk:
                try:
                    images.append(load_image(path, min_side=self.encoder.spec.resize))
                    ok.append(path)
                except CaptionerError as err:
                    results[path] = err
            if images:
                hyps = self.caption_pil(images, decoding, batch_size=len(images))
                for path, h in zip(ok, hyps):
                    results[path] = Captioned(Path(path), h, self.text(h[0]))
            for path in chunk:
                yield path, results[path]

    # ---- the Python API: cap(x) -------------------------------------------------------------------------
    @torch.no_grad()
    def caption_pil(self, images: Sequence, decoding: Decoding | None = None, batch_size: int = 16,
                    **settings) -> list[list[Hypothesis]]:
        """RGB PIL images (already decoded: see captioner.vision.images) -> the n-best for each, batched.
        decoding, settings: as caption_features."""
        decoding = Decoding.of(decoding, **settings)
        out: list[list[Hypothesis]] = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.encoder.preprocess(img) for img in images[i:i + batch_size]])
            with self.precision.autocast():
                feats = self.encoder(x.to(self.device)).float()
            out.extend(self.caption_features(feats, decoding))
        return out

    def __call__(self, images, n_best: int | None = None, batch_size: int = 16, decoding: Decoding | None = None,
                 **settings):
        """Caption one image or a list of them.

        An image is a path, a PIL image, an (H, W, 3) uint8 numpy array or a (3, H, W) tensor. One image
        gives its caption (a str); a list gives a list, captioned in batches of `batch_size`. With n_best=k
        each caption becomes the k best as [{"caption": ..., "score": ...}, ...], best first (score: what
        ranked them: with reranking lp per word + weight x consensus, else the beam's ranking score, the
        summed log-probability when length_penalty is 0).

        How it decodes is a `captioner.Decoding` (`decoding=`), or any of its fields as keywords, which
        replace those of `decoding`: beam_size (default 3, or n_best when that is larger), max_len,
        length_penalty, guards (the decode-time fluency constraints; default: the measured best,
        `captioner.Guards.off()` for plain beam search) and rerank (consensus reranking with the model's
        neighbour index, `captioner.Rerank.off()`: the beam's order); with an index each n-best dict also
        has "consensus" and "confidence" (0..1). A bad input raises CaptionerError naming it.
        A path that starts with http:// or https:// is downloaded (captioner.vision.download).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if n_best is not None:
            settings["n_best"] = n_best
            if decoding is None and "beam_size" not in settings and isinstance(n_best, int):
                settings["beam_size"] = max(Decoding().beam_size, n_best)  # the beam widens to the n-best
        decoding = Decoding.of(decoding, **settings)
        decoded = []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, Path)) else ("image" if single else f"images[{i}]")
            decoded.append(as_image(item, name, min_side=self.encoder.spec.resize))
        hyps = self.caption_pil(decoded, decoding, batch_size=batch_size) if decoded else []
        if n_best is None:
            results = [self.text(h[0]) for h in hyps]
        else:
            results = [[{**self.as_dict(x), "score": float(x.score)} for x in h] for h in hyps]
        return results[0] if single else results
