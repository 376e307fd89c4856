"""Open-vocabulary decoding measured: variants side by side on Flickr8k dev and coco-dev, and the copy weight.

    python3 benchmarks/open_vocab.py --flickr8k ../shared/datasets/flickr8k --coco ../shared/datasets/coco-dev
        [--checkpoint NAME_OR_FILE ...] [--variants 'off;copy;must=0.5;copy=0.1,must=0.5'] [--cache cache] [--json OUT]
    python3 benchmarks/open_vocab.py --fit-copy --flickr8k ../shared/datasets/flickr8k [--checkpoint ...]
    python3 benchmarks/open_vocab.py --recall --flickr8k ../shared/datasets/flickr8k

Variants (captioner.model.decoding.OpenVocab settings, beam 3, the default guards and reranking, as
`captioner evaluate` decodes): "off" (the caption vocabulary alone), "default" (OpenVocab()), and any
settings of OpenVocab as "copy=W,must=P,floor=F" (copy: the tags mixed into the next-word distribution;
must: constrained search for a tag at least P probable; floor: the check of "dog" and the other checked
words; a setting not named keeps OpenVocab's default, so name all three to compare them). For each: BLEU-1, BLEU-4, CIDEr
(COCO caption evaluation x100, no METEOR), CHAIR-i, CHAIR-s, captions saying "dog" and of those wrong, and
the words beyond the caption vocabulary said / said correctly (the word is in a reference), and the fluency
counts (captions with a bad ending, with a word repeated).

--recall (with --flickr8k): for each tag word the vocabulary has, on the training images that two or more
captions name it on, the share whose tag is at least 0.05 (the checked words are those at 80% or more,
on at least 30 images).

--fit-copy: the copy weight that gives the Flickr8k dev references' tag words the highest likelihood under
teacher forcing (the decoder reads each reference; at every position whose word is a tag word the caption
vocabulary has, the mixed probability of that word is scored), printed for a grid of weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from captioner.data.records import load_records
from captioner.data.vocab import tokenize
from captioner.eval.fluency import fluency_counts
from captioner.eval.hallucination import object_hallucination
from captioner.eval.metrics import score_captions
from captioner.inference import Captioner
from captioner.model.constraints import Guards
from captioner.model.decoding import OpenVocab
from captioner.model.open_vocab import OpenVocabulary
from captioner.model.rerank import Rerank
from captioner.precision import FP32
from captioner.vision.features import extract_features
from captioner.vision.tags import word_probabilities


def variant(name: str) -> OpenVocab:
    if name == "off":
        return OpenVocab.off()
    if name == "default":
        return OpenVocab()
    settings = {}
    for part in name.split(","):
        key, _, value = part.partition("=")
        settings[key] = float(value)
    return OpenVocab(**settings)


def split_records(data: Path, split: str):
    records = [r for r in load_records(str(data)) if r.split == split]
    return records


def features_of(cap: Captioner, records, cache: Path) -> tuple[list, torch.Tensor]:
    store = extract_features(cap.encoder, [r.image for r in records], cache, precision=FP32)
    records = [r for r in records if r.image in store]
    return records, store.get([r.image for r in records])


def evaluate(cap: Captioner, records, feats: torch.Tensor, settings: OpenVocab) -> dict:
    t0 = time.perf_counter()
    hyps = cap.caption_features(feats, beam_size=3, guards=Guards(), rerank=Rerank(), open_vocab=settings)
    seconds = time.perf_counter() - t0
    keys = [str(r.image) for r in records]
    captions = {k: cap.text(h[0]) for k, h in zip(keys, hyps)}
    refs = {k: list(r.captions) for k, r in zip(keys, records)}
    totals = score_captions(refs, captions, meteor=False).totals
    objects = object_hallucination(captions, refs)
    dog = objects["objects"].get("dog", {"said": 0, "wrong": 0})
    new_said = new_right = 0
    for k in keys:
        ref_words = set(" ".join(refs[k]).lower().replace(".", " ").split())
        for w in captions[k].split():
            if w not in cap.vocab:
                new_said += 1
                new_right += w in ref_words
    fluency = fluency_counts(captions[k] for k in keys)
    return {"B1": totals["BLEU-1"], "B4": totals["BLEU-4"], "CIDEr": totals["CIDEr"],
            "CHAIR-i": 100 * objects["chair_i"], "CHAIR-s": 100 * objects["chair_s"],
            "dog": dog["said"], "dog wrong": dog["wrong"], "new words": new_said, "new right": new_right,
            "bad endings": fluency["bad_endings"], "repeats": fluency["repeats"],
            "seconds": seconds, "captions": captions}


@torch.no_grad()
def fit_copy(cap: Captioner, records, feats: torch.Tensor, grid: list[float]) -> None:
    tags = cap.tag_vocab
    q_all = word_probabilities(cap.encoder, feats)
    rows_p, rows_m, rows_q = [], [], []
    for i in range(0, len(records), 100):
        recs = records[i:i + 100]
        f = feats[i:i + 100]
        q = q_all[i:i + 100]
        seqs, which = [], []
        for j, r in enumerate(recs):
            for c in r.captions:
                seqs.append(cap.vocab.encode(c, max_len=20))
                which.append(j)
        which_t = torch.tensor(which)
        T = max(map(len, seqs))
        tokens = torch.full((len(seqs), T), cap.vocab.pad_id, dtype=torch.long)
        for n, s in enumerate(seqs):
            tokens[n, :len(s)] = torch.tensor(s)
        # The mixture with copy weight 1 gives m * q; the decoder alone p: the grid is scored from both.
        wrapped = OpenVocabulary(cap.searchable, tags, q[which_t], OpenVocab(copy=1.0), cap.vocab.end_id)
        state = wrapped.init_state(f[which_t])
        known = tags.known_ids
        for t in range(T - 1):
            target = tokens[:, t + 1]
            inner, qn, scale = state
            log_probs, inner = cap.searchable.step(tokens[:, t], inner)
            probs = log_probs.exp()
            mass = probs[:, known].sum(dim=1)
            state = (inner, qn, scale)
            hit = torch.isin(target, known)
            if hit.any():
                rows = hit.nonzero().squeeze(1)
                cols = torch.tensor([tags.column[cap.vocab.words[int(v)]] for v in target[rows]])
                rows_p.append(probs[rows, target[rows]])
                rows_m.append(mass[rows])
                rows_q.append(qn[rows, cols])
    p, m, q = torch.cat(rows_p), torch.cat(rows_m), torch.cat(rows_q)
    print(f"{len(p)} tag-word positions in {len(records)} images' references")
    for w in grid:
        ll = ((1 - w) * p + w * m * q).clamp_min(1e-12).log().mean()
        print(f"copy {w:.2f}: mean log-likelihood of the tag words {ll:.4f}")


def recall(cap: Captioner, records, feats: torch.Tensor, least: int = 30) -> None:
    """For each tag word the caption vocabulary has: on the training images that two or more captions name
    it on, how often its tag is at least 0.05, and the median tag (the words OpenVocab.checked comes from)."""
    q = word_probabilities(cap.encoder, feats)
    named = [Counter(w for c in r.captions for w in set(tokenize(c))) for r in records]
    rows = []
    for word, j in cap.tag_vocab.column.items():
        if word not in cap.vocab:
            continue
        on = [i for i, counts in enumerate(named) if counts[word] >= 2]
        if len(on) >= least:
            tag = q[on, j]
            rows.append((float((tag >= 0.05).float().mean()), word, len(on), float(tag.median())))
    for share, word, n, median in sorted(rows, reverse=True):
        print(f"{word:<12} {n:5d} images  tag >= 0.05 on {100 * share:3.0f}%  median {median:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flickr8k", type=Path)
    ap.add_argument("--coco", type=Path)
    ap.add_argument("--checkpoint", nargs="*", default=[])
    ap.add_argument("--variants", default="off,copy")
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--fit-copy", action="store_true")
    ap.add_argument("--recall", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cap = Captioner.from_checkpoints(args.checkpoint, precision=FP32)
    if args.fit_copy:
        records, feats = features_of(cap, split_records(args.flickr8k, "val"), args.cache)
        fit_copy(cap, records, feats, [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
        return 0
    if args.recall:
        recall(cap, *features_of(cap, split_records(args.flickr8k, "train"), args.cache))
        return 0
    sets = []
    if args.flickr8k:
        sets.append(("flickr8k dev", *features_of(cap, split_records(args.flickr8k, "val"), args.cache)))
    if args.coco:
        sets.append(("coco-dev", *features_of(cap, split_records(args.coco, "train"), args.cache)))
    report = {}
    cols = ["B1", "B4", "CIDEr", "CHAIR-i", "CHAIR-s", "dog", "dog wrong", "new words", "new right", "bad endings", "repeats",
            "seconds"]
    print("| variant | set | " + " | ".join(cols) + " |")
    for name in args.variants.split(";"):
        for set_name, records, feats in sets:
            if args.limit:
                records, feats = records[:args.limit], feats[:args.limit]
            r = evaluate(cap, records, feats, variant(name))
            report[f"{name} | {set_name}"] = r
            print(f"| {name} | {set_name} | " + " | ".join(
                f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
