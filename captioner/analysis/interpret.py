"""Interpretable cells: which hidden units of a trained decoder track a property of the words it writes.

After Karpathy, Johnson and Fei-Fei, "Visualizing and understanding recurrent networks" (2015): record every
unit's activation at every word, correlate each unit with a per-word property, and show the best units.

The activation of a word is the top layer's state after the decoder READ that word as its input (h_t, and
the cell state c_t for the LSTM): the state that then predicts the next word. Properties, one number per word:

- position:       index of the word in its caption (0, 1, 2, ...);
- noun phrase:    1 inside a determiner..noun span, from a tiny lexicon-based heuristic (`noun_phrases`);
                  no POS tagger, since nltk's tagger needs data files this project does not download;
- colour:         1 for a colour word;
- after det.:     1 when the previous word is a determiner.

One caption has ~10 words: too few for a correlation. So the units are ranked on a corpus of captions the
model itself writes: the n-best list of beam search for every image given (e.g. 10 images x 10 captions ~
1000 words), plus the greedy captions, which are the ones displayed. Ranking is by |Pearson r| between a
unit's activation and the property over all words (for a 0/1 property this is the point-biserial r).

    report = analyse(model, vocab, features)            # features (N, F) image vectors
    write_heatmap(report, "cells.png"); write_html(report, "cells.html")
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.atomic import atomic_write, atomic_write_text
from captioner.model.decoder import CaptionDecoder
from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError
from captioner.model.decoding import DEFAULT
from captioner.model.search import beam_search, captioning_policy, greedy

# ---- a tiny lexicon-based tagger (caption English is simple: "a man in a red shirt rides a bike") ------
DETERMINERS = frozenset("a an the this that these those some several many two three four five six one "
                        "another his her their its each".split())
COLOURS = frozenset("red orange yellow green blue purple pink brown black white gray grey silver gold "
                    "golden tan blond blonde dark light colorful colourful striped".split())
# Words that may sit between a determiner and its head noun.
MODIFIERS = COLOURS | frozenset(
    "big small little large young old tall short long little baby older younger wet dry snowy grassy "
    "sandy rocky busy crowded empty wooden metal plastic open other same first front back several "
    "professional small-sized huge tiny happy smiling curly shirtless muddy and".split())


def noun_phrases(words: list[str]) -> list[bool]:
    """True for the words of each determiner + modifiers + head-noun span.

    Heuristic: a span starts at a determiner, takes every following modifier (small word lists above,
    "and" included for "black and white"), then ONE head word if it is not another determiner. So compound
    nouns ("a tennis player") are cut after their first word, and a noun phrase without a determiner
    ("people walking") is missed: good enough for finding units that fire inside noun phrases.
    """
    inside = [False] * len(words)
    i = 0
    while i < len(words):
        if words[i] not in DETERMINERS:
            i += 1
            continue
        inside[i] = True
        j = i + 1
        while j < len(words) and words[j] in MODIFIERS:
            inside[j] = True
            j += 1
        if j < len(words) and words[j] not in DETERMINERS:
            inside[j] = True
            j += 1
        i = j
    return inside


PROPERTIES: dict[str, Callable[[list[str]], list[float]]] = {
    "position": lambda ws: [float(t) for t in range(len(ws))],
    "noun phrase": lambda ws: [float(x) for x in noun_phrases(ws)],
    "colour": lambda ws: [float(w in COLOURS) for w in ws],
    "after det.": lambda ws: [float(t > 0 and ws[t - 1] in DETERMINERS) for t in range(len(ws))],
}


# ---- recording ---------------------------------------------------------------------------------------
@torch.no_grad()
def record(model: CaptionDecoder, features: torch.Tensor, captions: list[list[int]],
           start_id: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    """Teacher-force `captions` (word ids, no <start>/<end>) on images features (N, F).

    Returns per caption its activations (n_words, U) and the U unit names: "h0".."h{H-1}" for the top
    layer's h_t, then "c0".. for the LSTM's cell state. Row t is the state after reading word t.
    """
    model.eval()
    N, T = len(captions), max(map(len, captions))
    L, lstm = model.cfg.num_layers, model.cfg.cell == "lstm"
    ids = torch.zeros(N, T, dtype=torch.long)  # (N, T) padded with 0; padding rows are sliced off below
    for i, cap in enumerate(captions):
        ids[i, :len(cap)] = torch.tensor(cap, dtype=torch.long)
    state = model.init_state(features)
    _, state = model.step(torch.full((N,), start_id, dtype=torch.long), state)  # read <start>
    steps = []
    for t in range(T):
        _, state = model.step(ids[:, t], state)
        top = [state[L - 1]] + ([state[2 * L - 1]] if lstm else [])  # h_L (N, H) [, c_L (N, H)]
        steps.append(torch.cat(top, dim=1))  # (N, U)
    acts = torch.stack(steps, dim=1)  # (N, T, U)
    H = model.cfg.hidden_dim
    names = [f"h{k}" for k in range(H)] + ([f"c{k}" for k in range(H)] if lstm else [])
    return [acts[i, :len(cap)] for i, cap in enumerate(captions)], names


def correlations(acts: torch.Tensor, prop: torch.Tensor) -> torch.Tensor:
    """Pearson r of every unit with a property: acts (N, U), prop (N,) -> (U,); 0 for constant units."""
    a = acts.double() - acts.double().mean(0)  # (N, U) centred
    p = prop.double() - prop.double().mean()  # (N,)
    denom = a.norm(dim=0) * p.norm()  # (U,)
    r = (a * p[:, None]).sum(0) / denom.clamp_min(1e-12)
    return torch.where(denom > 1e-12, r, torch.zeros_like(r)).float()


def rank_units(acts: torch.Tensor, prop: torch.Tensor, top: int = 3) -> list[tuple[int, float]]:
    """The `top` units most correlated with `prop` (by |r|), as (unit index, r), best first."""
    r = correlations(acts, prop)
    order = r.abs().argsort(descending=True)[:top]
    return [(int(u), float(r[u])) for u in order]


# ---- the analysis --------------------------------------------------------------------------------------
@dataclass
class Caption:
    words: list[str]
    acts: torch.Tensor  # (n_words, U)


@dataclass
class CellReport:
    unit_names: list[str]  # U names, see record
    shown: list[Caption]  # the greedy caption of each image: what the figures display
    corpus_words: int  # words the ranking used
    corpus_captions: int
    best: dict[str, list[tuple[int, float]]]  # property -> [(unit, r)], best first; [] when constant


def analyse(model: CaptionDecoder, vocab: Vocabulary, features: torch.Tensor, n_best: int = 10,
            max_len: int = DEFAULT.max_len, top: int = 2) -> CellReport:
    """Caption features (N, F) greedily (shown) and with beam n_best (ranking corpus); rank units per property."""
    model.eval()
    searchable = captioning_policy(model, vocab)  # as captions are decoded everywhere
    shown_ids = greedy(searchable, features, max_len=max_len, start_id=vocab.start_id, end_id=vocab.end_id)
    corpus_ids, corpus_feats = [], []
    for i, hyps in enumerate(beam_search(searchable, features, beam_size=n_best, n_best=n_best, max_len=max_len,
                                         start_id=vocab.start_id, end_id=vocab.end_id)):
        for cap in [shown_ids[i]] + [h.tokens for h in hyps]:
            corpus_ids.append(cap)
            corpus_feats.append(i)
    corpus_ids, corpus_feats = _dedupe(corpus_ids, corpus_feats)
    acts, names = record(model, features[corpus_feats], corpus_ids, vocab.start_id)
    words = [[vocab.words[w] for w in cap] for cap in corpus_ids]
    all_acts = torch.cat(acts)  # (N_words, U)
    best = {}
    for prop_name, prop in PROPERTIES.items():
        values = torch.tensor([v for ws in words for v in prop(ws)])  # (N_words,)
        # A property no word has (no colour in any caption) ranks nothing: every r would be 0.
        best[prop_name] = rank_units(all_acts, values, top=top) if values.std() > 0 else []
    shown_acts, _ = record(model, features, [c or [vocab.unk_id] for c in shown_ids], vocab.start_id)
    shown = [Caption([vocab.words[w] for w in c], a) for c, a in zip(shown_ids, shown_acts) if c]
    return CellReport(names, shown, len(all_acts), len(corpus_ids), best)


def _dedupe(captions: list[list[int]], images: list[int]) -> tuple[list[list[int]], list[int]]:
    """Drop repeated (image, caption) pairs and empty captions: greedy is often also the beam's best."""
    seen, caps, imgs = set(), [], []
    for cap, img in zip(captions, images):
        key = (img, tuple(cap))
        if cap and key not in seen:
            seen.add(key)
            caps.append(cap)
            imgs.append(img)
    return caps, imgs


def chosen_units(report: CellReport) -> list[tuple[str, int, float]]:
    """(property, unit, r) for every ranked unit, without showing one unit twice."""
    out, seen = [], set()
    for prop, ranked in report.best.items():
        for unit, r in ranked:
            if unit not in seen:
                seen.add(unit)
                out.append((prop, unit, r))
    return out


def summary(report: CellReport) -> str:
    lines = [f"ranked on {report.corpus_words} words of {report.corpus_captions} captions"]
    for prop, ranked in report.best.items():
        units = ", ".join(f"{report.unit_names[u]} (r={r:+.2f})" for u, r in ranked) or \
            "- (no word in the corpus has it, or every word has)"
        lines.append(f"  {prop:<12} {units}")
    for cap in report.shown:
        lines.append(f"  caption: {' '.join(cap.words)}")
    return "\n".join(lines)


# ---- rendering -----------------------------------------------------------------------------------------
def _unit_scale(report: CellReport, unit: int) -> float:
    """Largest |activation| of a unit over the shown captions: h is in [-1, 1] but c is unbounded."""
    peak = max(float(c.acts[:, unit].abs().max()) for c in report.shown)
    return peak if peak > 0 else 1.0


def write_heatmap(report: CellReport, path: str | Path, caption_index: int = 0) -> Path:
    """Units (rows: the chosen ones) x words (columns) of one shown caption, each row scaled to [-1, 1]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = report.shown[caption_index]
    units = chosen_units(report)
    if not units:
        raise CaptionerError("no unit to show: the captions are too short to correlate anything")
    grid = torch.stack([cap.acts[:, u] / _unit_scale(report, u) for _, u, _ in units])  # (units, words)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cap.words), 0.9 + 0.32 * len(units)), dpi=90)
    im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cap.words)), cap.words, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(units)), [f"{report.unit_names[u]}  {p} r={r:+.2f}" for p, u, r in units],
                  fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    ax.set_title("activation after reading each word (row-scaled)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    # Whole or not at all: a kill or a full disk never leaves half a figure.
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png"))
    plt.close(fig)
    return path


def _colour(value: float) -> str:
    """-1 blue .. 0 white .. +1 red, as a CSS rgb()."""
    v = max(-1.0, min(1.0, value))
    fade = int(255 * (1 - abs(v)))
    return f"rgb(255,{fade},{fade})" if v >= 0 else f"rgb({fade},{fade},255)"


def write_html(report: CellReport, path: str | Path) -> Path:
    """A self-contained page: for each chosen unit, every shown caption with words coloured by activation."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Interpretable cells</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "span.w{padding:0 .2em;margin:0 .05em;border-radius:3px;font-family:monospace}"
             "p{margin:.3em 0}</style></head><body>",
             "<h1>Interpretable cells</h1>",
             f"<p>Units ranked on {report.corpus_words} words of {report.corpus_captions} captions the model "
             "wrote (greedy + beam n-best). Red: positive activation, blue: negative, scaled per unit. "
             "Each word shows the state after the decoder read it.</p>"]
    for prop, unit, r in chosen_units(report):
        scale = _unit_scale(report, unit)
        parts.append(f"<h2>{html.escape(report.unit_names[unit])}: {html.escape(prop)} (r = {r:+.2f})</h2>")
        for cap in report.shown:
            spans = "".join(
                f"<span class='w' style='background:{_colour(float(a) / scale)}' title='{float(a):+.3f}'>"
                f"{html.escape(w)}</span>" for w, a in zip(cap.words, cap.acts[:, unit]))
            parts.append(f"<p>{spans}</p>")
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))
