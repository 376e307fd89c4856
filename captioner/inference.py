"""A trained captioner in use: checkpoint -> (encoder, decoder, vocabulary) -> captions.

`Captioner` is what caption.py and evaluate.py share: it rebuilds the model from a checkpoint (the
shipped default when none is named; several make an ensemble, see captioner.model.ensemble), checks that the
encoder it was trained on is the one it will be fed, and turns image vectors or image files into
captions with greedy or beam search.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from captioner import checkpoint
from captioner.vision.encoders import Encoder, build_encoder, spec_with_defaults
from captioner.errors import CaptionerError
from captioner.vision.images import load_image
from captioner.eval import fluency
from captioner.model.constraints import EndGuard, NoRepeatNgram, NoRepeatWord
from captioner.model.search import Hypothesis, SuppressWords, beam_search

log = logging.getLogger("captioner")

DEFAULT_CHECKPOINT_NAME = "flickr8k.pt"


def default_checkpoint() -> Path:
    """The model shipped inside the package (trained on Flickr8k train, selected on dev)."""
    path = Path(str(resources.files("captioner") / "pretrained" / DEFAULT_CHECKPOINT_NAME))
    if not path.is_file():
        raise CaptionerError(f"the shipped model {path} is missing from this install; pass --checkpoint")
    return path


@dataclass
class Captioned:
    path: Path
    hypotheses: list[Hypothesis]  # n-best, best first
    caption: str  # the best one, as text


class Captioner:
    def __init__(self, loaded: checkpoint.LoadedModel, device: torch.device | None = None):
        self.model = loaded.model
        self.vocab = loaded.vocab
        self.encoder_spec = loaded.encoder
        self.checkpoint = loaded.checkpoint
        self.device = device or torch.device("cpu")
        self.model.to(self.device).eval()
        self._encoder: Encoder | None = None
        # Search never emits <unk> (nor <pad>/<start>): see SuppressWords.
        self.searchable = SuppressWords(self.model, [self.vocab.unk_id, self.vocab.pad_id, self.vocab.start_id])

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: torch.device | None = None) -> Captioner:
        return cls(checkpoint.load_model(path or default_checkpoint()), device)

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], device: torch.device | None = None) -> Captioner:
        """One checkpoint (or none: the shipped model): exactly `from_checkpoint`. Several: an ensemble
        that averages their next-word probabilities; they must share vocabulary and image features."""
        if len(paths) <= 1:
            return cls.from_checkpoint(paths[0] if paths else None, device)
        return cls(checkpoint.ensemble_of([checkpoint.load_model(p) for p in paths], paths), device)

    @property
    def encoder(self) -> Encoder:
        """Built on first use: evaluating from cached features never needs the CNN."""
        if self._encoder is None:
            # A spec stored before flip_average or pooling existed means the plain features (the defaults).
            stored = spec_with_defaults(self.encoder_spec)
            encoder = build_encoder(self.encoder_spec["name"], flip_average=stored["flip_average"],
                                    pooling=stored["pooling"])
            fine_tuned = self.checkpoint.get("encoder_state")
            if fine_tuned is not None:  # trained with the encoder's last blocks: its own weights, frozen now
                checkpoint.load_state(encoder, fine_tuned, "checkpoint's encoder_state")
                encoder.freeze()
                encoder.spec = replace(encoder.spec, weights=self.encoder_spec["weights"])
            actual = asdict(encoder.spec)
            differs = [k for k in actual if k in self.encoder_spec and actual[k] != self.encoder_spec[k]]
            if differs:
                raise CaptionerError(
                    f"the checkpoint was trained on {self.encoder_spec['name']} features with other "
                    f"settings ({', '.join(differs)}) than this install's encoder provides")
            self._encoder = encoder.to(self.device).eval()
        return self._encoder

    def constrained(self, no_repeat_ngram: int = 0, end_guard: bool = False, no_repeat_word: bool = False):
        """The searchable decoder with the decode-time constraints of captioner.model.constraints."""
        if no_repeat_ngram < 0:
            raise CaptionerError(f"no-repeat n-gram size must be 0 (off) or positive, got {no_repeat_ngram}")
        model = self.searchable
        if no_repeat_ngram:
            model = NoRepeatNgram(model, no_repeat_ngram)
        if no_repeat_word:
            model = NoRepeatWord(model)
        if end_guard:
            ids = lambda words: [self.vocab.ids[w] for w in words if w in self.vocab]  # noqa: E731
            model = EndGuard(model, self.vocab.end_id, ids(fluency.CLOSED_CLASS), ids(fluency.ADJECTIVES),
                             ids(fluency.PREDICATIVE), self.vocab.ids.get("and"))
        return model

    @torch.no_grad()
    def caption_features(self, features: torch.Tensor, beam_size: int = 3, max_len: int = 20,
                         n_best: int = 1, batch_size: int = 100, length_penalty: float = 0.0,
                         no_repeat_ngram: int = 0, end_guard: bool = False,
                         no_repeat_word: bool = False) -> list[list[Hypothesis]]:
        """features (N, F) image vectors -> the n-best hypotheses for each image.

        length_penalty: beam search's GNMT alpha (0: rank by the summed log-probability).
        no_repeat_ngram: no n-gram of this size twice in a caption (0: off). end_guard: no caption ends on
        a determiner, preposition, conjunction or dangling adjective. no_repeat_word: no word twice in a
        row. See captioner.model.constraints. Off by default (plain beam search); no_repeat_ngram=2 with both guards
        measured best on the shipped model (README, "Fluency").
        """
        searchable = self.constrained(no_repeat_ngram, end_guard, no_repeat_word)
        if length_penalty < 0:
            raise CaptionerError(f"length penalty must be 0 (off) or positive, got {length_penalty}")
        if beam_size < 1:
            raise CaptionerError(f"beam size must be at least 1, got {beam_size}")
        if n_best > beam_size:
            raise CaptionerError(f"n-best ({n_best}) cannot exceed the beam size ({beam_size})")
        if features.shape[-1] != self.model.feature_dim:
            raise CaptionerError(f"features have {features.shape[-1]} dimensions; the model expects "
                                 f"{self.model.feature_dim}")
        out: list[list[Hypothesis]] = []
        for i in range(0, len(features), batch_size):
            chunk = features[i:i + batch_size].to(self.device, torch.float32)
            out.extend(beam_search(searchable, chunk, beam_size=beam_size, max_len=max_len, n_best=n_best,
                                   length_penalty=length_penalty, start_id=self.vocab.start_id,
                                   end_id=self.vocab.end_id))
        return out

    def text(self, hypothesis: Hypothesis) -> str:
        return self.vocab.decode(hypothesis.tokens)

    @torch.no_grad()
    def caption_images(self, paths: Sequence[Path], beam_size: int = 3, max_len: int = 20, n_best: int = 1,
                       batch_size: int = 16, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                       end_guard: bool = False, no_repeat_word: bool = False):
        """Yield (path, Captioned) for each readable image and (path, CaptionerError) for each bad one,
        in the order given; one bad file never stops the others."""
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            tensors, ok, results = [], [], {}
            for path in chunk:
                try:
                    tensors.append(self.encoder.preprocess(load_image(path)))
                    ok.append(path)
                except CaptionerError as err:
                    results[path] = err
            if tensors:
                feats = self.encoder(torch.stack(tensors).to(self.device))
                hyps = self.caption_features(feats, beam_size=beam_size, max_len=max_len, n_best=n_best,
                                             length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                                             end_guard=end_guard, no_repeat_word=no_repeat_word)
                for path, h in zip(ok, hyps):
                    results[path] = Captioned(Path(path), h, self.text(h[0]))
            for path in chunk:
                yield path, results[path]
