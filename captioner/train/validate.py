"""Scoring the model on the dev split between epochs: teacher-forced loss and greedy captions' metrics."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from captioner.data.vocab import Vocabulary
from captioner.distributed import Dist
from captioner.eval.metrics import score_captions
from captioner.model.decoder import CaptionDecoder
from captioner.model.output import Targets
from captioner.model.search import captioning_policy, greedy
from captioner.precision import Precision


@torch.no_grad()
def dev_loss(model: CaptionDecoder, loader: DataLoader, device: torch.device, pad_id: int,
             precision: Precision) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        mask = batch.targets != pad_id
        with precision.autocast():  # summed over the real tokens, chunked (captioner.model.output)
            total += float(model(batch.features, batch.inputs, mask, Targets(batch.targets[mask])))
        tokens += int(mask.sum())
    return total / max(1, tokens)


@torch.no_grad()
def evaluate(model: CaptionDecoder, features: torch.Tensor, references: list[list[str]], vocab: Vocabulary,
             max_len: int, device: torch.device, batch_size: int = 500, dist: Dist = Dist(), *,
             precision: Precision) -> dict[str, float]:
    """Greedy-decode every image and score the captions against all references (BLEU, ROUGE-L, CIDEr).

    Under torchrun each process decodes every world-th image; the captions are gathered and rank 0's
    scores are shared, so every process takes the same early-stopping decision.
    """
    model.eval()
    searchable = captioning_policy(model, vocab)  # as captions are decoded everywhere
    mine = torch.arange(dist.rank, len(features), dist.world)
    hyps: list[str] = []
    for i in range(0, len(mine), batch_size):
        with precision.autocast():
            ids = greedy(searchable, features[mine[i:i + batch_size]].to(device), max_len=max_len,
                         start_id=vocab.start_id, end_id=vocab.end_id)
        hyps.extend(vocab.decode(seq) for seq in ids)
    gathered = dist.gather(hyps)
    totals = None
    if dist.is_main:
        captions = {int(i): gathered[r][j] for r in range(dist.world)
                    for j, i in enumerate(range(r, len(features), dist.world))}
        scores = score_captions({i: refs for i, refs in enumerate(references)}, captions, meteor=False)
        totals = dict(scores.totals)
    return dist.broadcast(totals)
