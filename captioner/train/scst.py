"""Self-critical sequence training (Rennie et al. 2017): after cross-entropy, optimise CIDEr-D itself.

For each training image the model samples `samples` captions from its own distribution; each sample's
reward is its CIDEr-D against the image's references (document frequencies over the whole training set,
see captioner/cider.py), minus a baseline:

- "greedy" (the paper): the reward of the model's own greedy caption for that image, so a sample is
  pushed up exactly when it beats what the model would say at test time;
- "mean": the mean reward of the image's other samples (no extra decoding).

The loss is REINFORCE with that baseline, -(r - b) * log p(sample), averaged over the sampled tokens; the
sampled caption's <end> counts as a token, so the model also learns when to stop. Sampling, the greedy
baseline and the log-probabilities all run with dropout off, so the gradient is that of the policy that
was sampled (and the one decoded at test time). Like decoding, the policy never emits <unk>, <pad> or
<start>: their log-probabilities are masked to -inf before the softmax here too. The gradient comes from
the forward pass that drew the samples (`Recorded`), not from a second, teacher-forced pass over them.

Only the decoder trains (image vectors come from the feature cache); batches are of images, not captions.

SCST's known failure is the bad ending: CIDEr-D scores the words of a caption, not whether it stopped in
the right place, so "a boy is playing with a blue" keeps nearly all the reward of "... with a blue ball"
and the policy learns to stop early on a dangling word. Options against it (all off by default):

- train.scst_reward_end: score <end> as a word of the caption and of every reference (as the reference
  SCST implementation does), so the n-grams "ball <end>" and "grass <end>" are in the references and
  "a <end>" or "blue <end>" are not: ending in the wrong place costs reward;
- train.scst_end_weight: the weight of the <end> token's term in the loss (0: the policy gradient never
  pushes on when to stop; > 1: it pushes harder);
- train.scst_bad_ending_penalty / scst_repeat_penalty: subtracted from the reward of a caption that ends on
  a determiner, preposition, conjunction or dangling adjective / says a word twice in a row (the rules of
  captioner.eval.fluency). They are part of the reward, so the greedy baseline pays them too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from captioner.eval.cider import CiderD
from captioner.eval.fluency import ends_badly, repeated_word
from captioner.config import TrainConfig
from captioner.data.vocab import Vocabulary, tokenize
from captioner.errors import NonFiniteLoss
from captioner.model.decoder import CaptionDecoder
from captioner.model.search import captioning_policy, greedy, sample
from captioner.precision import Precision

log = logging.getLogger("captioner")

BASELINES = ("greedy", "mean")
# The parts of an SCST step, timed: drawing the samples (the forward pass, kept for the gradient), their
# CIDEr-D rewards, the greedy baseline's decoding and rewards, and the policy gradient (backward, optimizer step).
PARTS = ("sample", "reward", "baseline", "gradient")


@dataclass
class ScstResult:
    loss: float  # mean per-token policy-gradient loss
    sample_reward: float  # mean CIDEr-D of the sampled captions
    greedy_reward: float  # mean CIDEr-D of the greedy captions (nan with the "mean" baseline)
    step: int
    seconds: dict[str, float] = field(default_factory=dict)  # where the epoch's time went: PARTS


class RewardData:
    """The training images for SCST: their rows in the feature array and their tokenized references."""

    def __init__(self, images: list, rows: np.ndarray, references: list[list[str]]):
        self.rows = np.asarray(rows, dtype=np.int64)
        self._tokenized = {i: [tokenize(c) for c in refs] for i, refs in enumerate(references)}
        self.cider = CiderD(self._tokenized)
        self._cider_with_end: CiderD | None = None
        self.images = images

    def __len__(self) -> int:
        return len(self.rows)

    def cider_with_end(self) -> CiderD:
        """CIDEr-D over the references with END_WORD appended to each (document frequencies included)."""
        if self._cider_with_end is None:
            self._cider_with_end = CiderD({i: [[*r, END_WORD] for r in refs] for i, refs in self._tokenized.items()})
        return self._cider_with_end


END_WORD = "<end>"  # tokenize() never yields it, so it cannot collide with a caption's words


def rewards(data: RewardData, keys, captions: list[list[int]], vocab: Vocabulary, cfg: TrainConfig) -> torch.Tensor:
    """The reward of each caption (word ids, no <start>/<end>) for the image `keys[i]`: its CIDEr-D, with
    the options of the module docstring. A caption cut at max_len never said <end> and is scored without it."""
    words = [vocab.decode(c).split() for c in captions]
    if cfg.scst_reward_end:
        scored = [[*w, END_WORD] if len(c) < cfg.eval_max_len else w for w, c in zip(words, captions)]
        out = torch.tensor(data.cider_with_end().scores(keys, scored))
    else:
        out = torch.tensor(data.cider.scores(keys, words))
    if cfg.scst_bad_ending_penalty:
        out -= cfg.scst_bad_ending_penalty * torch.tensor([float(ends_badly(w)) for w in words])
    if cfg.scst_repeat_penalty:
        out -= cfg.scst_repeat_penalty * torch.tensor([float(repeated_word(w) is not None) for w in words])
    return out


def policy_weights(token_adv: torch.Tensor, token_is_end: torch.Tensor, end_weight: float = 1.0,
                   n_tokens: int | None = None) -> torch.Tensor:
    """Each sampled token's weight on its -log p in the REINFORCE loss: (r - b) / N, the <end> terms times
    end_weight (so the weight changes the <end> share, not the other tokens' scale). N is `n_tokens`, or
    the number of tokens given."""
    weights = token_adv / (token_adv.numel() if n_tokens is None else n_tokens)
    if end_weight != 1.0:
        weights = weights * torch.where(token_is_end, end_weight, 1.0)
    return weights


def policy_loss(token_logp: torch.Tensor, token_adv: torch.Tensor, token_is_end: torch.Tensor,
                end_weight: float = 1.0) -> torch.Tensor:
    """REINFORCE over the N sampled tokens: -(r - b) * log p(token), the <end> terms weighted by end_weight,
    averaged over the N tokens. Training computes the same sum chunked over the tokens, from the
    weights above (captioner.model.output), without building the (N, V) log-probabilities."""
    return -(policy_weights(token_adv, token_is_end, end_weight) * token_logp).sum()


def sequence_tensors(captions: list[list[int]], max_len: int, start_id: int, end_id: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled captions (word ids, no <start>/<end>) -> teacher-forcing inputs and targets (N, T).

    A caption that stopped with <end> gets it as its last target; one cut at max_len has none.
    """
    T = max(1, max(len(c) for c in captions) + 1)
    inputs = torch.full((len(captions), T), pad_id, dtype=torch.long)
    targets = torch.full((len(captions), T), pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        inputs[i, 0] = start_id
        inputs[i, 1:len(c) + 1] = torch.tensor(c[:T - 1], dtype=torch.long)
        targets[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        if len(c) < max_len:
            targets[i, len(c)] = end_id
    inputs[targets == pad_id] = pad_id  # a caption cut at max_len: no input after its last word
    return inputs, targets


class Recorded:
    """Captions drawn from the policy with the decoder's forward pass kept for the policy gradient.

    Drawing a caption already runs the model on it: the teacher-forced pass over the sampled captions
    that REINFORCE needs computes the same h_t and the same next-word probabilities again. So the draw
    keeps, for each step t, the top layer's outputs h_t of the captions still running, inside the autograd
    graph of the recurrence, and the probabilities p_t it drew from (fp32, without a graph). Once the
    rewards are known, `backward` applies the gradient of the policy loss sum_i w_i * -log p(y_i) with no
    second forward pass: d/dz_i = w_i (p_i - onehot(y_i)) for each drawn token's logits, through W_hy by
    two matrix multiplies a step, and then into the recurrence by one backward through the kept graph.
    The result equals the loss and gradients of the teacher-forced pass over the same captions
    (`policy_loss` on `sequence_tensors`; tests/test_scst.py).

    It is a decoder seen through a recorder, as captioning_policy sees it (the suppressed words never
    drawn), so search.sample itself draws the captions (`draw_recorded`): the same ones, from the same
    uniform numbers, as sample() on the policy.
    """

    def __init__(self, model: CaptionDecoder, suppressed: torch.Tensor):
        self.model, self.suppressed = model, suppressed
        self.h: list[torch.Tensor] = []  # per step (b_t, H), in the graph
        self.probs: list[torch.Tensor] = []  # per step (b_t, V) fp32, the suppressed words at 0
        self.rows: list[torch.Tensor] = []  # per step (b_t,) which caption each row is
        self.words: list[torch.Tensor] = []  # per step (b_t,) the word drawn (<end> included)
        self.captions: list[list[int]] = []  # word ids, no <start> / <end>
        self._running = torch.empty(0, dtype=torch.long)

    # The decoder interface search drives; sample() runs without gradients, the recorded pass with them.
    def init_state(self, features: torch.Tensor):
        self._running = torch.arange(features.shape[0], device=features.device)
        with torch.enable_grad():
            return self.model.init_state(features)

    def step(self, tokens: torch.Tensor, state):
        with torch.enable_grad():
            h, state = self.model.step_hidden(tokens, state)
        log_probs = torch.log_softmax(self.model.out(h.detach()).float(), dim=-1)
        log_probs[:, self.suppressed] = float("-inf")
        self.h.append(h)
        self.probs.append(torch.softmax(log_probs, dim=-1))  # <end> included, even where the draw skips it
        self.rows.append(self._running)
        return log_probs, state

    def select_state(self, state, index: torch.Tensor):
        self._running = self._running[index]
        with torch.enable_grad():
            return self.model.select_state(state, index)

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.words)

    def backward(self, advantage: torch.Tensor, end_id: int, end_weight: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Accumulate the gradient of the REINFORCE loss (`policy_loss`: -(r - b) * log p(token) averaged
        over the drawn tokens, <end> weighted by end_weight) into the model's .grad; returns the loss.

        `dtype`: the number format of the output layer's two gradient products (bf16 under autocast)."""
        out, total = self.model.out, self.tokens  # W_hy
        loss = torch.zeros((), dtype=torch.float32, device=advantage.device)
        grad_w = torch.zeros_like(out.weight, dtype=torch.float32)
        grad_b = torch.zeros(out.weight.shape[0], dtype=torch.float32, device=out.weight.device)
        w_mm = out.weight.detach().to(dtype)
        grads_h = []
        for h, p, rows, y in zip(self.h, self.probs, self.rows, self.words):
            w = policy_weights(advantage[rows], y == end_id, end_weight, n_tokens=total)
            loss -= (w * p.gather(1, y[:, None]).squeeze(1).log()).sum()
            g = p * w[:, None]  # d loss / d logits = w (p - onehot(y))
            g[torch.arange(len(y), device=g.device), y] -= w
            g_mm = g.to(dtype)
            grads_h.append(torch.mm(g_mm, w_mm).to(h.dtype))
            grad_w += torch.mm(g_mm.t(), h.detach().to(dtype)).float()
            grad_b += g.sum(0)
        torch.autograd.backward(self.h, grads_h)
        for param, grad in ((out.weight, grad_w), (out.bias, grad_b)):
            if param is None:
                continue
            grad = grad.to(param.dtype)
            param.grad = grad if param.grad is None else param.grad + grad
        return loss.detach()


def draw_recorded(model: CaptionDecoder, features: torch.Tensor, suppressed: torch.Tensor, max_len: int,
                  generator: torch.Generator | None, start_id: int, end_id: int) -> Recorded:
    """Sample one caption per row of `features` from the captioning policy, keeping the forward pass for
    `Recorded.backward` (the model in eval mode, so that it is the policy decoded at test time)."""
    record = Recorded(model, suppressed.to(features.device))
    record.captions = sample(record, features, max_len=max_len, generator=generator, start_id=start_id,
                             end_id=end_id)
    table = torch.full((features.shape[0], len(record.h)), end_id, dtype=torch.long, device=features.device)
    for i, caption in enumerate(record.captions):
        table[i, :len(caption)] = torch.tensor(caption, dtype=torch.long)
    record.words = [table[rows, t] for t, rows in enumerate(record.rows)]
    return record


def scst_epoch(model: torch.nn.Module, features: np.ndarray, data: RewardData, vocab: Vocabulary,
               optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, device: torch.device,
               generator: torch.Generator, desc: str = "scst", *, precision: Precision,
               progress: bool = True) -> ScstResult:
    """One pass over the training images in shuffled batches of cfg.scst_batch_size images.

    Sampling (whose forward pass the policy gradient reuses) and the greedy baseline run their GEMMs in
    `precision`; the log-softmax, the rewards, the advantages and the loss are fp32.
    """
    K, max_len = cfg.scst_samples, cfg.eval_max_len
    policy = captioning_policy(model, vocab)
    suppressed = policy.word_ids
    order = torch.randperm(len(data), generator=generator).numpy()
    batches = [order[i:i + cfg.scst_batch_size] for i in range(0, len(order), cfg.scst_batch_size)]
    totals = {"loss": 0.0, "tokens": 0, "sample": 0.0, "greedy": 0.0, "n": 0}
    seconds = dict.fromkeys(PARTS, 0.0)
    start = time.perf_counter()
    # disable=None: no bar where stderr is not a terminal
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
               disable=None if progress else True)
    for idx in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.scst_lr
        feats = torch.from_numpy(np.asarray(features[data.rows[idx]], dtype=np.float32)).to(device)
        repeated = feats.repeat_interleave(K, dim=0)  # (B*K, F): image i's samples are rows iK..iK+K-1
        keys = np.repeat(idx, K)
        model.eval()  # dropout off: sample, baseline and gradient all belong to the test-time policy
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with precision.autocast():  # the draw keeps its forward pass for the policy gradient (Recorded)
            recorded = draw_recorded(model, repeated, suppressed, max_len, generator, vocab.start_id, vocab.end_id)
        drawn = recorded.captions
        t1 = time.perf_counter()
        with torch.no_grad(), precision.autocast():
            reward = rewards(data, keys, drawn, vocab, cfg)
            t2 = time.perf_counter()
            if cfg.scst_baseline == "greedy":
                base_caps = greedy(policy, feats, max_len=max_len, start_id=vocab.start_id, end_id=vocab.end_id)
                base = rewards(data, idx, base_caps, vocab, cfg)
                baseline = base.repeat_interleave(K)
                totals["greedy"] += float(base.sum())
            else:  # the mean of the image's other K-1 samples
                per_image = reward.view(-1, K)
                baseline = ((per_image.sum(1, keepdim=True) - per_image) / max(1, K - 1)).view(-1)
        advantage = (reward - baseline).to(device)
        t3 = time.perf_counter()

        n = recorded.tokens
        loss = recorded.backward(advantage, vocab.end_id, cfg.scst_end_weight,
                                 dtype=precision.dtype if precision.reduced else torch.float32)
        del recorded  # the kept graph
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step, loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        for part, seconds_taken in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            seconds[part] += seconds_taken
        totals["loss"] += loss.item() * n
        totals["tokens"] += n
        totals["sample"] += float(reward.sum())
        totals["n"] += len(idx)
        bar.set_postfix(reward=f"{totals['sample'] / (totals['n'] * K):.3f}",
                        img_s=f"{totals['n'] / (time.perf_counter() - start):.0f}")
    n_img = max(1, totals["n"])
    return ScstResult(loss=totals["loss"] / max(1, totals["tokens"]), sample_reward=totals["sample"] / (n_img * K),
                      greedy_reward=totals["greedy"] / n_img if cfg.scst_baseline == "greedy" else float("nan"),
                      step=step, seconds=seconds)
