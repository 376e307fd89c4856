"""A results gallery: one HTML page showing each image with its generated caption (and, from `evaluate`,
its references and per-image BLEU-4 and CIDEr), the totals on top, sortable.

    write_gallery(Path("val.html"), items, title="flickr8k val", totals=scores.totals)

The page is self-contained apart from its thumbnails, which are small JPEGs written beside it in
OUT_files/ (so a 5,000-image page stays a few hundred kilobytes of HTML, and the browser fetches only the
thumbnails scrolled into view: `loading="lazy"`).

The gallery never deletes what it did not make. OUT_files/ holds a marker file (`.captioner-gallery`) that
says the gallery made it; a later page replaces only a folder so marked (or an empty one), and refuses, in
one line and before any captioning, an OUT_files/ that is someone else's (say, the photos being captioned,
or a browser's "save page" folder). The new thumbnails are written into a fresh folder first and swapped in
by renames, and the page itself goes through captioner.atomic, so a kill leaves the old page or the new one.

The cards are plain HTML, readable without script; a few lines of script re-order them (worst CIDEr first
is the default where there are scores) and filter them by a word.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from captioner.atomic import atomic_write_text
from captioner.errors import CaptionerError
from captioner.vision.images import thumbnail

log = logging.getLogger("captioner")

THUMB_SIZE = 224  # longer side of a thumbnail, in pixels
SHOWN_METRICS = ("BLEU-4", "CIDEr")  # per image, on each card
MARKER = ".captioner-gallery"  # in OUT_files/: this folder holds a gallery's thumbnails and nothing else


@dataclass
class GalleryItem:
    image: Path
    caption: str
    references: Sequence[str] = ()
    scores: Mapping[str, float] = field(default_factory=dict)  # x100, as captioner.eval.metrics gives them
    n_best: Sequence[tuple[str, float]] = ()  # (caption, score) best first; shown when there are several
    confidence: float | None = None  # in [0, 1], from the model's neighbour index (captioner.model.confidence)
    neighbours: Sequence[tuple[str, Sequence[str]]] = ()  # nearest training images: (name, their captions)
    tags: Sequence[tuple[str, float]] = ()  # the encoder's tag words the caption says, with their probability


def thumbs_folder(out: Path) -> Path:
    return out.with_name(out.stem + "_files")


def check_page_path(out: str | os.PathLike) -> Path:
    """`out` as a Path if a gallery page can go there (checked before any captioning); else CaptionerError."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise CaptionerError(f"{out}: the gallery is an HTML page; name it OUT.html")
    if not out.parent.is_dir():
        raise CaptionerError(f"{out.parent}: no such folder for the gallery page")
    _check_thumbs_folder(thumbs_folder(out))
    return out


def _check_thumbs_folder(folder: Path) -> None:
    """Refuse an OUT_files/ that the gallery did not make: replacing it would delete someone's files."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CaptionerError(f"{folder}: exists and is not a gallery's thumbnail folder; the page's thumbnails "
                             "go there, so move it or name the page otherwise")
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise CaptionerError(f"{folder}: a folder the gallery did not make (no {MARKER} in it); its thumbnails "
                             "would replace it, so move it or name the page otherwise")


def write_gallery(out: str | os.PathLike, items: Sequence[GalleryItem], title: str = "captions",
                  totals: Mapping[str, float] | None = None, subtitle: str = "",
                  thumb_size: int = THUMB_SIZE) -> Path:
    """Write the page to `out` and its thumbnails to OUT_files/; returns `out`.

    An image that cannot be read gets a card without a thumbnail (and one warning for all of them).
    """
    out = check_page_path(out)
    folder = thumbs_folder(out)
    # A fresh folder beside the old one, marked as the gallery's before anything goes in; swapped in at the end.
    fresh = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(fresh, 0o777 & ~mask)  # mkdtemp makes it private; the thumbnails are as readable as the page
        (fresh / MARKER).write_text(f"thumbnails of {out.name}, written by captioner; replaced with the page\n",
                                    encoding="utf-8")
        cards, unreadable = [], []
        for i, item in enumerate(items):
            name = f"{i:05d}.jpg"
            try:
                thumb = thumbnail(item.image, thumb_size)
                thumb.save(fresh / name, "JPEG", quality=82)
                size = thumb.size
            except CaptionerError as err:
                unreadable.append(str(err))
                name, size = None, None
            cards.append(_card(i, item, f"{quote(folder.name)}/{name}" if name else None, size))
        _swap_in(fresh, folder)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)  # made by this call, holding only its thumbnails
        raise
    if unreadable:
        log.warning("gallery: %d image(s) could not be read for a thumbnail (first: %s)",
                    len(unreadable), unreadable[0])
    scored = any(item.scores for item in items)
    page = _PAGE.format(
        title=html.escape(title), subtitle=html.escape(subtitle), count=len(items),
        totals=_totals(totals) if totals else "", options=_sort_options(scored),
        cards="\n".join(cards), script=_SCRIPT,
    )
    atomic_write_text(out, page)
    return out


def _swap_in(fresh: Path, folder: Path) -> None:
    """Make `fresh` the thumbnail folder; the old one goes only if the gallery made it (checked again now)."""
    _check_thumbs_folder(folder)
    if folder.is_dir():
        old = fresh.with_name(fresh.name.removesuffix(".tmp") + ".old")
        os.rename(folder, old)
        os.rename(fresh, folder)
        shutil.rmtree(old)  # a marked gallery folder (or an empty one): thumbnails of an earlier page
    else:
        os.rename(fresh, folder)


def _totals(totals: Mapping[str, float]) -> str:
    cells = "".join(f"<div class=total><span class=metric>{html.escape(k)}</span>"
                    f"<span class=value>{v:.2f}</span></div>" for k, v in totals.items())
    return f'<section id=totals aria-label="corpus scores">{cells}</section>'


def _sort_options(scored: bool) -> str:
    options = []
    if scored:
        for metric in reversed(SHOWN_METRICS):  # CIDEr first
            options += [(f"{metric}:asc", f"{metric}, worst first"), (f"{metric}:desc", f"{metric}, best first")]
    options += [("confidence:asc", "confidence, lowest first"), ("confidence:desc", "confidence, highest first")]
    options += [("index:asc", "original order"), ("name:asc", "file name"), ("length:asc", "caption length")]
    return "".join(f'<option value="{v}">{html.escape(label)}</option>' for v, label in options)


def _card(index: int, item: GalleryItem, src: str | None, size: tuple[int, int] | None) -> str:
    e = html.escape
    data = [f'data-index="{index}"', f'data-name="{e(item.image.name.lower())}"',
            f'data-length="{len(item.caption.split())}"']
    for metric in SHOWN_METRICS:
        if metric in item.scores:
            data.append(f'data-{metric.lower().replace("-", "")}="{item.scores[metric]:.4f}"')
    if item.confidence is not None:
        data.append(f'data-confidence="{item.confidence:.4f}"')
    if src:
        w, h = size
        picture = (f'<a href="{e(item.image.resolve().as_uri())}"><img src="{e(src)}" width={w} height={h} '
                   f'loading="lazy" decoding="async" alt="{e(item.caption)}"></a>')
    else:
        picture = '<div class=missing>image unreadable</div>'
    scores = "".join(f'<span class=score title="{e(m)}">{e(m)} <b>{item.scores[m]:.1f}</b></span>'
                     for m in SHOWN_METRICS if m in item.scores)
    parts = [f'<article class=card {" ".join(data)}>', picture, '<div class=text>',
             f'<p class=caption>{e(item.caption)}</p>']
    if item.confidence is not None:
        scores += f'<span class=score title="confidence">confidence <b>{item.confidence:.2f}</b></span>'
    if scores:
        parts.append(f'<p class=scores>{scores}</p>')
    if item.tags:
        said = ", ".join(f"{e(w)} {p:.2f}" for w, p in item.tags)
        parts.append(f'<p class=tags title="the image tags the caption says, with their probability">tags: {said}</p>')
    if len(item.n_best) > 1:
        rows = "".join(f"<li>{e(c)} <span class=lp>{s:.2f}</span></li>" for c, s in item.n_best)
        parts.append(f'<details><summary>{len(item.n_best)}-best</summary><ol class=nbest>{rows}</ol></details>')
    if item.neighbours:
        near = "".join(f'<li><span class=lp>{e(name)}</span> {e(" / ".join(caps))}</li>' for name, caps in item.neighbours)
        parts.append(f'<details class=neighbours><summary>{len(item.neighbours)} nearest training images</summary>'
                     f'<ol>{near}</ol></details>')
    if item.references:
        refs = "".join(f"<li>{e(r)}</li>" for r in item.references)
        parts.append(f'<details class=refs><summary>{len(item.references)} references</summary>'
                     f'<ul>{refs}</ul></details>')
    parts.append(f'<p class=path title="{e(str(item.image))}">{e(item.image.name)}</p></div></article>')
    return "".join(parts)


_PAGE = """<!doctype html>
<html lang=en>
<head>
<meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }}
header {{ position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 10px 16px;
          z-index: 1; }}
h1 {{ font-size: 18px; margin: 0 8px 6px 0; display: inline-block; }}
.sub {{ color: #666; }}
#totals {{ display: flex; flex-wrap: wrap; gap: 6px; margin: 6px 0; }}
.total {{ background: #eef3fa; border-radius: 4px; padding: 2px 8px; }}
.total .metric {{ color: #456; margin-right: 6px; }} .total .value {{ font-weight: 600; }}
.controls {{ display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; padding: 16px; }}
.card {{ background: #fff; border-radius: 6px; box-shadow: 0 1px 2px #0002; overflow: hidden; }}
.card img {{ display: block; width: 100%; height: 200px; object-fit: cover; background: #ddd; }}
.missing {{ height: 200px; display: flex; align-items: center; justify-content: center; background: #eee;
            color: #999; }}
.text {{ padding: 8px 10px; }}
.caption {{ font-size: 15px; font-weight: 600; margin: 0 0 4px; }}
.scores {{ margin: 0 0 4px; }} .score {{ margin-right: 10px; color: #555; }}
.tags {{ margin: 0 0 4px; color: #2a6b3a; font-size: 13px; }}
details {{ margin: 2px 0; color: #444; }} summary {{ cursor: pointer; color: #357; }}
ul, ol {{ margin: 2px 0; padding-left: 18px; }} .lp {{ color: #888; font-size: 12px; }}
.path {{ color: #888; font-size: 12px; margin: 4px 0 0; overflow: hidden; text-overflow: ellipsis;
         white-space: nowrap; }}
.hidden {{ display: none; }}
</style>
</head>
<body>
<header>
<h1>{title}</h1><span class=sub>{subtitle} <span id=shown>{count}</span> of {count} images</span>
{totals}
<div class=controls>
<label>Sort <select id=sort>{options}</select></label>
<label>Find <input id=find type=search placeholder="a word in the caption or references"></label>
</div>
</header>
<main id=cards>
{cards}
</main>
<script>
{script}
</script>
</body>
</html>
"""

# Re-orders the existing cards (no re-rendering, so lazy images already loaded stay loaded).
_SCRIPT = """
const cards = document.getElementById('cards');
const all = Array.from(cards.children);
const sortBox = document.getElementById('sort'), findBox = document.getElementById('find');
function keyOf(card, field) {
  const v = card.dataset[field];
  return field === 'name' ? v : (v === undefined ? NaN : parseFloat(v));
}
function resort() {
  const [metric, dir] = sortBox.value.split(':');
  const field = metric.toLowerCase().replace('-', '');
  const sign = dir === 'desc' ? -1 : 1;
  const sorted = all.slice().sort((a, b) => {
    const x = keyOf(a, field), y = keyOf(b, field);
    if (field === 'name') return sign * x.localeCompare(y);
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
    return sign * (x - y) || a.dataset.index - b.dataset.index;
  });
  cards.append(...sorted);
}
function refilter() {
  const word = findBox.value.trim().toLowerCase();
  let shown = 0;
  for (const card of all) {
    const hit = !word || card.textContent.toLowerCase().includes(word);
    card.classList.toggle('hidden', !hit);
    shown += hit;
  }
  document.getElementById('shown').textContent = shown;
}
sortBox.addEventListener('change', resort);
findBox.addEventListener('input', refilter);
resort();
"""
