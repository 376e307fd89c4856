"""Tune consensus reranking on Flickr8k dev, confirm it on coco-dev, and fit and measure the confidence.

    python3 benchmarks/rerank_tune.py gather --flickr ../shared/datasets/flickr8k \
        --coco ../shared/datasets/coco-dev --cache-dir cache --out sets.pt
    python3 benchmarks/rerank_tune.py decode --inputs sets.pt --out nbest.json [--device cuda]
    python3 benchmarks/rerank_tune.py grid nbest.json               # lambda x k x n on dev, CiderD scale
    python3 benchmarks/rerank_tune.py confidence nbest.json [--inputs sets.pt] [--write-calibration]

gather: every Flickr8k dev (val) image's and every coco-dev (train) image's vector (through the feature
cache) and references, in one small file. decode: each is decoded once with the model (default: the
shipped ensemble) at beam --beam (10) with its --beam n-best and the default guards, and at beam 3
(today's default, for the baseline), and saved with each candidate's words and log-probability and the
photo's 60 nearest training images (similarity, index id) from the model's neighbour index. Decoding
1,130 images at beam 10 takes minutes on a GPU and much longer on a busy 2-core CPU; the vectors are the
CPU's, so only the search runs elsewhere.

grid: reranks that n-best offline for each lambda, k and n (the beam's first n candidates), and prints
dev CIDEr (CiderD with document frequencies over dev's references, tokenized as the trainer does: the
pycocoevalcap formula on the regex tokenizer), then scores the best settings and the beam's own top-1
with the COCO evaluation (PTB tokenizer, as `captioner evaluate`) on dev and coco-dev.

confidence: for the chosen setting (--weight, --k, --n), the features of each photo's chosen caption
(captioner.model.confidence), fits the quality model to "per-image CIDEr >= --good" on dev and coco-dev
pooled and, with --inputs, the photo model (the similarities and the log tag probabilities from the
encoder's classifier on each photo's vector) to "a Flickr8k dev photo", and prints the AUROC of the confidence for telling a Flickr8k dev photo (higher) from a coco-dev
photo, and its Spearman correlation with per-image CIDEr over both, fitted on all of them and 5-fold
cross-validated (each fold scored by models fitted on the other four), for the quality model, the photo
model and the confidence quality * photo ** --power. --write-calibration stores the fit on all of them in
the index (--index, default the one decode used).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from captioner.data.records import load_records
from captioner.data.vocab import tokenize
from captioner.eval.cider import CiderD
from captioner.eval.fluency import fluency_counts, format_fluency
from captioner.eval.metrics import CaptionScorer
from captioner.eval.ranking import auroc, spearman
from captioner.inference import Captioner
from captioner.model.confidence import (Calibration, Confidence, features_of, photo_feature_names,
                                        photo_features_of)
from captioner.model.consensus import Consensus
from captioner.model.neighbours import NeighbourIndex, find_index
from captioner.model.rerank import Rerank
from captioner.vision.features import extract_features
from captioner.vision.tags import word_probabilities

K_MAX = 60


def gather(args) -> None:
    """The two sets' image vectors (through the feature cache) and references, in one file."""
    cap = Captioner.from_checkpoints(args.checkpoint)
    sets = {}
    for name, data, split in (("flickr8k-dev", args.flickr, "val"), ("coco-dev", args.coco, "train")):
        records = [r for r in load_records(data) if r.split == split]
        store = extract_features(cap.encoder, [r.image for r in records], Path(args.cache_dir), precision=cap.precision)
        records = [r for r in records if r.image in store]
        sets[name] = {"images": [str(r.image) for r in records], "references": [list(r.captions) for r in records],
                      "features": store.get([r.image for r in records]).half()}
    torch.save(sets, args.out)


def decode(args) -> None:
    """Each image's --beam n-best (the guards on, no reranking) and its K_MAX nearest training images."""
    cap = Captioner.from_pretrained(args.checkpoint or None, device=args.device, precision="fp32")
    if cap.judged is None:
        sys.exit("the model has no neighbour index (build it with benchmarks/build_neighbours.py)")
    out = {"beam": args.beam, "device": str(cap.device), "sets": {}}
    part, parts = map(int, args.part.split("/"))
    for name, item in torch.load(args.inputs, weights_only=True).items():
        keep = slice(part, None, parts)  # this process's share of the images
        item = {k: v[keep] for k, v in item.items()}
        feats = item["features"].float()
        hyps = cap.caption_features(feats, beam_size=args.beam, n_best=args.beam, rerank=Rerank.off())
        if name in args.baseline:  # today's default, beam 3
            top3 = cap.caption_features(feats, beam_size=3, n_best=1, rerank=Rerank.off())
        else:
            top3 = [[None]] * len(hyps)
        sims, ids = cap.judged.index.search(feats, K_MAX)
        out["sets"][name] = [{"image": image, "references": refs, "beam3": t[0] and cap.text(t[0]),
                              "candidates": [[cap.text(x), x.log_prob] for x in h],
                              "neighbours": ids[i].tolist(), "similarities": [round(s, 5) for s in sims[i].tolist()]}
                             for i, (image, refs, h, t) in enumerate(zip(item["images"], item["references"], hyps, top3))]
        print(f"{name}: {len(hyps)} images decoded on {cap.device}", file=sys.stderr)
    out["index"] = str(find_index(_files(args.checkpoint)))
    Path(args.out).write_text(json.dumps(out))


def _files(checkpoints):
    from captioner import checkpoint

    return checkpoint.pretrained_paths(checkpoints)


class Offline:
    """The saved n-best with their consensus for any k, computed once per (image, k)."""

    def __init__(self, saved: dict, index: NeighbourIndex):
        self.sets = saved["sets"]
        self.consensus = Consensus(index)
        self._knn: dict = {}

    def knn(self, name: str, i: int, k: int) -> np.ndarray:
        key = (name, i, k)
        if key not in self._knn:
            item = self.sets[name][i]
            self._knn[key] = self.consensus.scores([c.split() for c, _ in item["candidates"]], item["neighbours"][:k])
        return self._knn[key]

    def choose(self, name: str, weight: float, k: int, n: int) -> list[int]:
        picks = []
        for i, item in enumerate(self.sets[name]):
            cands = item["candidates"][:n]
            lp = np.array([lpw / (len(c.split()) + 1) for c, lpw in cands])
            score = lp + (weight * self.knn(name, i, k)[:n] if weight else 0.0)
            picks.append(int(np.argmax(score)))
        return picks


def captions(offline: Offline, name: str, picks: list[int]) -> dict[str, str]:
    return {it["image"]: it["candidates"][p][0] for it, p in zip(offline.sets[name], picks)}


def references(offline: Offline, name: str) -> dict[str, list[str]]:
    return {it["image"]: it["references"] for it in offline.sets[name]}


def load(paths: list[str]) -> tuple[dict, Offline]:
    """One decode's output, or the parts of one (--part) merged."""
    saved = json.loads(Path(paths[0]).read_text())
    for other in paths[1:]:
        for name, items in json.loads(Path(other).read_text())["sets"].items():
            saved["sets"].setdefault(name, []).extend(items)
    return saved, Offline(saved, NeighbourIndex.load(saved["index"]))


def grid(args) -> None:
    saved, off = load(args.nbest)
    dev = off.sets["flickr8k-dev"]
    cider = CiderD({it["image"]: [tokenize(c) for c in it["references"]] for it in dev})

    def dev_cider(picks):
        return 100 * np.mean([cider.score(it["image"], it["candidates"][p][0].split()) for it, p in zip(dev, picks)])

    rows = []
    print(f"beam {saved['beam']} top-1 (no reranking): dev CIDEr {dev_cider([0] * len(dev)):.1f} (CiderD scale)")
    print(f"lp alone (weight 0): {dev_cider(off.choose('flickr8k-dev', 0.0, 1, saved['beam'])):.1f}")
    for n, k, w in itertools.product(args.n, args.k, args.weight):
        c = dev_cider(off.choose("flickr8k-dev", w, k, n))
        rows.append((c, n, k, w))
        print(f"n {n:>2}  k {k:>2}  weight {w:<4}  dev CIDEr {c:.1f}", flush=True)
    rows.sort(reverse=True)
    print("best:", *[f"n {n} k {k} weight {w}: {c:.1f}" for c, n, k, w in rows[:5]], sep="\n  ")
    with CaptionScorer(meteor=False) as scorer:
        for name in ("flickr8k-dev", "coco-dev"):
            refs = references(off, name)
            if any(it["beam3"] is None for it in off.sets[name]):
                print(f"{name:<13} beam 3 not decoded (--baseline)")
            else:
                t = scorer.score(refs, {it["image"]: it["beam3"] for it in off.sets[name]}).totals
                print(f"{name:<13} {'beam 3 (no reranking)':<26} CIDEr {t['CIDEr']:.1f}  BLEU-4 {t['BLEU-4']:.1f}  "
                      f"ROUGE-L {t['ROUGE-L']:.1f}", flush=True)
            for label, picks in [(f"beam {saved['beam']} top-1", [0] * len(off.sets[name]))] + [
                    (f"n {n} k {k} weight {w}", off.choose(name, w, k, n)) for _, n, k, w in rows[:args.confirm]]:
                chosen = captions(off, name, picks)
                t = scorer.score(refs, chosen).totals
                print(f"{name:<13} {label:<26} {format_fluency(fluency_counts(chosen.values()))}")
                print(f"{name:<13} {label:<26} CIDEr {t['CIDEr']:.1f}  BLEU-4 {t['BLEU-4']:.1f}  "
                      f"ROUGE-L {t['ROUGE-L']:.1f}", flush=True)


def confidence(args) -> None:
    saved, off = load(args.nbest)
    feats, cider, coco, images, sims10 = [], [], [], [], []
    with CaptionScorer(meteor=False) as scorer:
        for name in ("flickr8k-dev", "coco-dev"):
            picks = off.choose(name, args.weight, args.k, args.n)
            caps = captions(off, name, picks)
            per = scorer.score(references(off, name), caps).per_image
            for i, (it, p) in enumerate(zip(off.sets[name], picks)):
                sims = it["similarities"][:args.k]
                cand, lp = it["candidates"][p]
                feats.append(features_of(sims[0], float(np.mean(sims)), float(off.knn(name, i, args.k)[p]),
                                         lp / (len(cand.split()) + 1)))
                cider.append(per[it["image"]]["CIDEr"])
                coco.append(name == "coco-dev")
                images.append((name, it["image"]))
    x, cider, coco = np.array(feats), np.array(cider), np.array(coco)
    good = cider >= args.good
    print(f"{len(x)} photos ({(~coco).sum()} Flickr8k dev, {coco.sum()} coco-dev); good (CIDEr >= {args.good}): "
          f"{good.mean():.0%}")
    folds = np.random.default_rng(args.seed).permutation(len(x)) % 5

    def cross_validated(fit):  # each fold scored by a model fitted on the other four
        cv = np.zeros(len(x))
        for f in range(5):
            cv[folds == f] = fit(folds != f)(folds == f)
        return cv

    def show(label, fitted, cv):
        print(f"{label:<34} fitted on all: AUROC {auroc(fitted, ~coco):.3f}  Spearman {spearman(fitted, cider):.3f}"
              f"   5-fold cross-validated: AUROC {auroc(cv, ~coco):.3f}  Spearman {spearman(cv, cider):.3f}")

    quality_of = f"Flickr8k dev and coco-dev, per-image CIDEr >= {args.good}"
    cal = Calibration.fit(x, good, fitted_on=quality_of)
    print("quality model's weights (standardised):",
          dict(zip(("nearest", "mean_sim", "consensus", "lp"), np.round(cal.weights, 3))), "bias", round(cal.bias, 3))
    show("quality model (AUROC, Spearman)", cal(x),
         cross_validated(lambda tr: lambda te: Calibration.fit(x[tr], good[tr])(x[te])))
    for j, feature in enumerate(("nearest similarity", "mean similarity", "consensus", "lp per word")):
        print(f"  {feature:<20} alone: AUROC {auroc(x[:, j], ~coco):.3f}  Spearman {spearman(x[:, j], cider):.3f}")
    result = Confidence(cal)
    if args.inputs:  # the photo model: Flickr8k dev (1) vs coco-dev (0) from similarities and tags
        sets = torch.load(args.inputs, weights_only=True)
        encoder = Captioner.from_checkpoints(args.checkpoint).encoder
        probs = {}
        for name, item in sets.items():
            words = word_probabilities(encoder, item["features"].float()).numpy()
            probs.update({(name, image): row for image, row in zip(item["images"], words)})
        photo = photo_features_of(x[:, 0], x[:, 1], np.stack([probs[key] for key in images]))
        familiar_of = f"Flickr8k dev (1) vs coco-dev (0) photos, L2 {args.photo_l2}"
        model = Calibration.fit(photo, ~coco, l2=args.photo_l2, fitted_on=familiar_of, names=photo_feature_names())
        photo_cv = cross_validated(lambda tr: lambda te: Calibration.fit(photo[tr], (~coco)[tr], l2=args.photo_l2,
                                                                          names=photo_feature_names())(photo[te]))
        show("photo model alone", model(photo), photo_cv)
        result = Confidence(cal, model, args.power)
        quality_cv = cross_validated(lambda tr: lambda te: Calibration.fit(x[tr], good[tr])(x[te]))
        show(f"quality * photo ** {args.power:g}", result(x, photo), quality_cv * photo_cv ** args.power)
    if args.write_calibration:
        index = NeighbourIndex.load(args.index or saved["index"])
        index.calibration = {**result.to_dict(), "rerank": {"n_best": args.n, "weight": args.weight, "k": args.k}}
        index.save(args.index or saved["index"])
        print(f"calibration written to {args.index or saved['index']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("gather")
    a.add_argument("--flickr", required=True)
    a.add_argument("--coco", required=True)
    a.add_argument("--cache-dir", default="cache")
    a.add_argument("--checkpoint", action="append", default=[])
    a.add_argument("--out", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--inputs", required=True, help="the file `gather` wrote")
    d.add_argument("--checkpoint", action="append", default=[])
    d.add_argument("--device", default="auto")
    d.add_argument("--beam", type=int, default=10)
    d.add_argument("--part", default="0/1", help="i/n: decode every n-th image from the i-th (run n processes)")
    d.add_argument("--baseline", nargs="*", default=["flickr8k-dev", "coco-dev"],
                   help="the sets also decoded at beam 3 for the baseline")
    d.add_argument("--out", required=True)
    g = sub.add_parser("grid")
    g.add_argument("nbest", nargs="+")
    g.add_argument("--weight", type=float, nargs="+", default=[0.5, 1, 2, 3, 4, 6])
    g.add_argument("--k", type=int, nargs="+", default=[5, 10, 15, 30, 60])
    g.add_argument("--n", type=int, nargs="+", default=[5, 10])
    g.add_argument("--confirm", type=int, default=3, help="the best settings also scored as `captioner evaluate` does")
    c = sub.add_parser("confidence")
    c.add_argument("nbest", nargs="+")
    c.add_argument("--weight", type=float, default=Rerank().weight)
    c.add_argument("--k", type=int, default=Rerank().k)
    c.add_argument("--n", type=int, default=Rerank().n_best)
    c.add_argument("--good", type=float, default=50.0, help="per-image CIDEr (x100) that counts as good")
    c.add_argument("--inputs", help="the file `gather` wrote: with it, the photo model on tags is fitted too")
    c.add_argument("--checkpoint", action="append", default=[], help="the model whose encoder tags the photos")
    c.add_argument("--power", type=float, default=2.0, help="confidence = quality * photo ** power")
    c.add_argument("--photo-l2", type=float, default=0.03, help="the photo model's L2 penalty")
    c.add_argument("--seed", type=int, default=0, help="of the cross-validation's folds")
    c.add_argument("--index", help="the index to write the calibration to (default: the one decode used)")
    c.add_argument("--write-calibration", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    {"gather": gather, "decode": decode, "grid": grid, "confidence": confidence}[args.what](args)


if __name__ == "__main__":
    main()
