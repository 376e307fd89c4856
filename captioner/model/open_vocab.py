"""Open vocabulary: the encoder's tags let the decoder name what its caption data never had.

A decoder trained on Flickr8k knows 2,540 words; the encoder's ImageNet classifier knows 1,000 classes,
which `captioner.vision.tags` maps to 378 caption words ("tags"), 175 of them outside that vocabulary
("broccoli", "zebra", "laptop"). At search time the tags join the decoder's next-word distribution in
three ways: copy and the check in `OpenVocabulary`, a wrapper of the searchable decoder like those of
`captioner.model.constraints`, and constrained search in `constrained_beam_search`:

**Copy.** The decoder's probability mass on the tag words it knows is its "name an object now" mass m.
Within m, a share `copy` goes to the tag words in proportion to the photo's tag probabilities q:

    p'(w) = (1 - copy) p(w) + copy * m * q(w) / sum(q)        for every tag word w (known or not)

and every other word keeps p(w), so p' still sums to one. A tag the photo does not show loses part of the
decoder's mass ("dog" where the classifier sees no dog); a tag it shows gains it, even one the vocabulary
lacks. `copy` is one number measured on Flickr8k, where the tag words the vocabulary has occur
(dog, bicycle, beach, ball...): `benchmarks/open_vocab.py` picks the value that gives the dev references'
tag words the highest likelihood under teacher forcing.

**Check.** Some tag words the classifier sees almost whenever Flickr8k's captions say them: on the
training images that two or more captions call a dog, the "dog" tag is at least 0.05 on 97%. For such a
`checked` word, a photo whose tag is below `floor` scales its probability down by tag / floor, without
renormalising (a penalty on the search paths that say it, not a new distribution): "dog" where the
classifier sees none becomes unlikely. `benchmarks/open_vocab.py --recall` lists each word's recall.

**Constrained search.** A tag at least `must` probable is required: `constrained_beam_search` is Anderson et
al.'s constrained beam search (2017) for one word. Two banks of K beams advance together: bank 0 has not
said the word yet, bank 1 has; a bank-0 beam enters bank 1 by saying it, and only bank-1 beams may finish.
The word then goes where the decoder finds it most probable, instead of wherever a plain beam happens to
keep it. (captioner.inference runs it only where the plain best caption lacks the word, and keeps the
result only if its log-probability per word is at most `margin` below the plain caption's.)

**A word outside the vocabulary as the next input** needs an embedding, and the decoder has none for it.
It is fed the embedding of its *proxy*: the known tag word whose ImageNet classes are closest to its own,
measured by the cosine of the classifier's weight rows (mean over each word's classes): the classifier
already knows that broccoli is like cauliflower and a zebra like a horse. The text keeps the new word.
"""

from __future__ import annotations

import torch

from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError
from captioner.model.decoding import OpenVocab
from captioner.model.search import Hypothesis


class TagVocabulary:
    """The caption vocabulary extended with the tag words it lacks, and how the two meet.

    words: the extended vocabulary (the caption vocabulary's ids unchanged, new words after them);
    tag_ids (W,): each tag word's id in it; proxy (M,): the caption-vocabulary id fed in for each new word.
    """

    def __init__(self, vocab: Vocabulary, tag_words: tuple[str, ...], word_rows: torch.Tensor):
        """word_rows (W, D): each tag word's direction in the classifier's weight space (mean of its
        classes' rows), used to find each new word's proxy."""
        if word_rows.shape[0] != len(tag_words):
            raise CaptionerError(f"{word_rows.shape[0]} classifier rows for {len(tag_words)} tag words")
        self.vocab = vocab
        known = [j for j, w in enumerate(tag_words) if w in vocab]
        new = [j for j, w in enumerate(tag_words) if w not in vocab]
        if not known:
            raise CaptionerError("the caption vocabulary has none of the tag words: no open vocabulary")
        self.new_words = tuple(tag_words[j] for j in new)
        self.words = Vocabulary(vocab.words + self.new_words)
        ids = {w: i for i, w in enumerate(self.words.words)}
        self.tag_words = tag_words
        self.tag_ids = torch.tensor([ids[w] for w in tag_words], dtype=torch.long)
        self.known_ids = torch.tensor([vocab.ids[tag_words[j]] for j in known], dtype=torch.long)
        self.column = {w: j for j, w in enumerate(tag_words)}  # tag word -> its column in tag probabilities
        rows = torch.nn.functional.normalize(word_rows.float(), dim=1)
        nearest = (rows[new] @ rows[known].T).argmax(dim=1) if new else torch.zeros(0, dtype=torch.long)
        self.proxy = torch.tensor([vocab.ids[tag_words[known[k]]] for k in nearest.tolist()], dtype=torch.long)

    def required(self, tag_probs: torch.Tensor, must: float) -> torch.Tensor:
        """(B,) each image's required word (an extended-vocabulary id): its most probable tag when that is at
        least `must` probable (must > 0), else -1."""
        required = torch.full((tag_probs.shape[0],), -1, dtype=torch.long)
        if must > 0:
            best, which = tag_probs.float().max(dim=1)
            chosen = (best >= must).cpu()
            required[chosen] = self.tag_ids[which.cpu()[chosen]]
        return required

    def proxy_word(self, word: str) -> str:
        """The caption-vocabulary word that stands in for `word` (itself when the vocabulary has it)."""
        if word in self.vocab:
            return word
        return self.vocab.words[int(self.proxy[self.new_words.index(word)])]

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Extended ids -> caption-vocabulary ids the decoder can embed (new words -> their proxies)."""
        V = len(self.vocab)
        new = tokens >= V
        if not bool(new.any()):
            return tokens
        return torch.where(new, self.proxy.to(tokens.device)[(tokens - V).clamp(min=0)], tokens)


class OpenVocabulary:
    """A searchable decoder whose next-word distribution covers the tag words (see the module docstring).

    tag_probs (B, W): each image's tag-word probabilities, in the order of `tags.tag_words`, row-aligned
    with the features `init_state` will receive."""

    def __init__(self, model, tags: TagVocabulary, tag_probs: torch.Tensor, settings: OpenVocab, end_id: int):
        self.model = model
        self.tags = tags
        self.tag_probs = tag_probs.float()
        # Switched off (enabled False): the extended vocabulary with nothing moved, none required, none checked.
        self.settings = settings if settings.on else OpenVocab(copy=0.0, must=0.0, floor=0.0)
        self.end_id = end_id
        # The checked words the caption vocabulary has: their ids there and their tag-probability columns.
        words = [w for w in self.settings.checked if w in tags.vocab and w in tags.column]
        self.checked_ids = torch.tensor([tags.vocab.ids[w] for w in words], dtype=torch.long)
        self.checked_columns = torch.tensor([tags.column[w] for w in words], dtype=torch.long)

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def init_state(self, features):
        B, device = features.shape[0], features.device
        q = self.tag_probs.to(device)
        if q.shape[0] != B:
            raise CaptionerError(f"tag probabilities for {q.shape[0]} images, features for {B}")
        scale = torch.ones(B, 0, device=device)
        if self.settings.floor > 0:
            scale = (q[:, self.checked_columns.to(device)] / self.settings.floor).clamp(max=1.0)  # (B, checked words)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return self.model.init_state(features), q, scale

    def required(self) -> torch.Tensor:
        """(B,) each image's required word (an extended-vocabulary id), -1 where no tag is `must` probable."""
        return self.tags.required(self.tag_probs, self.settings.must)

    def step(self, tokens, state):
        inner, q, scale = state
        log_probs, inner = self.model.step(self.tags.inputs(tokens), inner)
        probs = log_probs.exp()
        b, V = probs.shape
        M = len(self.tags.new_words)
        probs = torch.cat([probs, probs.new_zeros(b, M)], dim=1)  # (b, V + M)
        copy = self.settings.copy
        if copy > 0:
            tag_ids = self.tags.tag_ids.to(probs.device)
            mass = probs[:, self.tags.known_ids.to(probs.device)].sum(dim=1, keepdim=True)  # (b, 1)
            probs[:, tag_ids] = (1 - copy) * probs[:, tag_ids] + copy * mass * q
        if scale.shape[1]:
            ids = self.checked_ids.to(probs.device)
            probs[:, ids] = probs[:, ids] * scale  # not renormalised: a penalty on the paths that say it
        return probs.log(), (inner, q, scale)

    def select_state(self, state, index):
        inner, q, scale = state
        return self.model.select_state(inner, index), q[index], scale[index]


@torch.no_grad()
def constrained_beam_search(model, features: torch.Tensor, must: torch.Tensor, beam_size: int = 3,
                            max_len: int = 20, n_best: int = 1, start_id: int = Vocabulary.start_id,
                            end_id: int = Vocabulary.end_id) -> list[list[Hypothesis]]:
    """Beam search in which image i's caption must say word must[i] (every must[i] >= 0): two banks of
    `beam_size` beams per image (see the module docstring), ranked by summed log-probability (no length
    penalty). An image whose word never fits within max_len gets no hypothesis (an empty list)."""
    K, B, device = beam_size, features.shape[0], features.device
    if K < 1 or not 1 <= n_best <= K:
        raise CaptionerError(f"constrained search needs 1 <= n_best <= beam_size, got {n_best}, {K}")
    neg_inf = float("-inf")
    must = must.to(device)
    rows = torch.arange(B, device=device).repeat_interleave(2 * K)  # (B*2K,) image of each row
    state = model.select_state(model.init_state(features), rows)
    live = torch.full((B, 2, K), neg_inf, device=device)  # [:, 0] bank 0 (not said yet), [:, 1] bank 1
    live[:, 0, 0] = 0.0
    words = torch.zeros(B, 2, K, max_len, dtype=torch.long, device=device)
    tokens = torch.full((B * 2 * K,), start_id, dtype=torch.long, device=device)
    fin_logp = torch.full((B, K), neg_inf, device=device)
    fin_words = torch.zeros(B, K, max_len, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    image = torch.arange(B, device=device)

    def finish(logp, length, said):  # merge (B, K) new finished hypotheses into the K best
        nonlocal fin_logp, fin_words, fin_len
        all_logp = torch.cat([fin_logp, logp], dim=1)
        best = all_logp.topk(K, dim=1).indices
        fin_logp = all_logp.gather(1, best)
        fin_len = torch.cat([fin_len, length], dim=1).gather(1, best)
        fin_words = torch.cat([fin_words, said], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_len))

    for t in range(max_len):
        log_probs, state = model.step(tokens, state)
        V = log_probs.shape[1]
        log_probs = log_probs.view(B, 2, K, V)
        if t == 0:
            log_probs[..., end_id] = neg_inf
        # Bank 1 ends: finished hypotheses of t words.
        finish(live[:, 1] + log_probs[:, 1, :, end_id], torch.full((B, K), t, device=device), words[:, 1])
        if t == max_len - 1:
            break
        ext0 = live[:, 0, :, None] + log_probs[:, 0]  # (B, K, V) bank-0 continuations
        said_now = ext0.gather(2, must[:, None, None].expand(-1, K, 1)).squeeze(2)  # (B, K) enter bank 1
        ext0[..., end_id] = neg_inf
        ext0.scatter_(2, must[:, None, None].expand(-1, K, 1), neg_inf)
        ext1 = live[:, 1, :, None] + log_probs[:, 1]
        ext1[..., end_id] = neg_inf
        top0, idx0 = ext0.view(B, K * V).topk(K, dim=1)
        top1, idx1 = torch.cat([ext1.view(B, K * V), said_now], dim=1).topk(K, dim=1)
        from_bank0 = idx1 >= K * V  # entered bank 1 by saying the word
        parent1 = torch.where(from_bank0, idx1 - K * V, idx1 // V)
        word1 = torch.where(from_bank0, must[:, None].expand(-1, K), idx1 % V)
        parent0, word0 = idx0 // V, idx0 % V
        prev0 = words[:, 0].gather(1, parent0[:, :, None].expand(-1, -1, max_len))
        prev1 = torch.where(from_bank0[:, :, None], words[:, 0].gather(1, parent1[:, :, None].expand(-1, -1, max_len)),
                            words[:, 1].gather(1, parent1[:, :, None].expand(-1, -1, max_len)))
        words = torch.stack([prev0, prev1], dim=1)
        words[:, 0, :, t], words[:, 1, :, t] = word0, word1
        live = torch.stack([top0, top1], dim=1)
        bank_of_parent = torch.stack([torch.zeros_like(parent0), (~from_bank0).long()], dim=1)  # (B, 2, K)
        parent = torch.stack([parent0, parent1], dim=1)
        state = model.select_state(state, ((image[:, None, None] * 2 + bank_of_parent) * K + parent).view(-1))
        tokens = torch.stack([word0, word1], dim=1).view(-1)
        if bool((fin_logp[:, K - 1] >= live.amax(dim=(1, 2))).all()):
            break  # no live beam can beat any image's K-th finished hypothesis: log-probabilities only fall
    return [[Hypothesis(tokens=fin_words[i, k, :int(fin_len[i, k])].tolist(), score=float(fin_logp[i, k]),
                        log_prob=float(fin_logp[i, k]))
             for k in range(n_best) if torch.isfinite(fin_logp[i, k])] for i in range(B)]
