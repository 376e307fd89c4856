"""The results gallery (captioner.eval.gallery): what the page holds, its order, and, in headless
Chromium, that the thumbnails and captions are on screen (a screenshot is kept in the test's tmp folder)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from browser import VISIBLE_JS, Browser
from captioner.errors import CaptionerError
from captioner.eval.gallery import MARKER, GalleryItem, check_page_path, thumbs_folder, write_gallery

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40), (120, 40, 160), (40, 180, 180)]


def photos(folder: Path, n: int, size=(640, 480)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:02d}.jpg"
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(path, quality=90)
        paths.append(path)
    return paths


def scored_items(paths):
    cider = [55.0, 3.5, 120.25, 0.0, 80.0, 12.0]
    return [GalleryItem(p, f"caption number {i} with words", [f"reference {i} a", f"reference {i} b"],
                        {"BLEU-4": cider[i] / 4, "CIDEr": cider[i]}) for i, p in enumerate(paths)]


def test_page_has_every_image_caption_reference_and_score(tmp_path):
    paths = photos(tmp_path / "img", 6)
    out = write_gallery(tmp_path / "val.html", scored_items(paths), title="val", totals={"BLEU-4": 21.3, "CIDEr": 53.5})
    page = out.read_text()
    thumbs = sorted(thumbs_folder(out).glob("*.jpg"))
    assert len(thumbs) == 6
    for thumb in thumbs:
        with Image.open(thumb) as im:
            assert max(im.size) <= 224 and im.format == "JPEG"
    assert page.count('loading="lazy"') == 6
    for i in range(6):
        assert f"caption number {i} with words" in page and f"reference {i} b" in page
    assert "53.50" in page and "21.30" in page  # totals
    assert "120.2" in page or "120.3" in page  # a per-image CIDEr
    # worst CIDEr first is the default sort
    first = re.search(r'<option value="([^"]+)"', page).group(1)
    assert first == "CIDEr:asc"


def test_html_is_escaped_and_unreadable_images_get_a_card(tmp_path):
    [good] = photos(tmp_path / "img", 1)
    broken = tmp_path / "img" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = [GalleryItem(good, "a <script>alert(1)</script> dog"), GalleryItem(broken, "never read")]
    page = write_gallery(tmp_path / "g.html", items).read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "image unreadable" in page and "never read" in page


def test_the_page_path_is_checked(tmp_path):
    with pytest.raises(CaptionerError, match="HTML page"):
        write_gallery(tmp_path / "out.txt", [])
    with pytest.raises(CaptionerError, match="no such folder"):
        write_gallery(tmp_path / "missing" / "out.html", [])


def test_the_users_own_files_folder_is_refused_never_deleted(tmp_path):
    """A folder named like the thumbnails' (a browser's "save page" folder, the photos being captioned) is
    someone else's: the page is refused in one line and every file in it stays."""
    [photo] = photos(tmp_path / "album_files", 1)
    before = photo.read_bytes()
    with pytest.raises(CaptionerError, match="album_files: a folder the gallery did not make"):
        check_page_path(tmp_path / "album.html")
    with pytest.raises(CaptionerError, match="did not make"):
        write_gallery(tmp_path / "album.html", [GalleryItem(photo, "a red square")])
    assert photo.read_bytes() == before and sorted(os.listdir(tmp_path / "album_files")) == ["photo_00.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["album_files"]  # no page, no leftovers
    (tmp_path / "other_files").write_text("a file, not a folder")
    with pytest.raises(CaptionerError, match="not a gallery's thumbnail folder"):
        check_page_path(tmp_path / "other.html")


def test_caption_cli_html_refuses_the_folder_of_the_photos_it_captions(tmp_path):
    folder = tmp_path / "album_files"
    [photo] = photos(folder, 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "captioner", "caption", str(folder), "--html",
                           str(tmp_path / "album.html")], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "album_files" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert photo.is_file() and not (tmp_path / "album.html").exists()


def test_a_new_page_replaces_only_its_own_thumbnails(tmp_path):
    paths = photos(tmp_path / "img", 6)
    out = tmp_path / "val.html"
    (tmp_path / "val_files").mkdir()  # an empty folder holds nothing to lose: taken
    write_gallery(out, scored_items(paths))
    folder = thumbs_folder(out)
    assert (folder / MARKER).is_file() and len(list(folder.glob("*.jpg"))) == 6
    write_gallery(out, scored_items(paths[:2]))  # the gallery's own folder: replaced, old thumbnails gone
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["00000.jpg", "00001.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["img", "val.html", "val_files"]  # no temporary left


def test_a_failed_page_keeps_the_old_page_and_thumbnails(tmp_path, monkeypatch):
    paths = photos(tmp_path / "img", 3)
    out = write_gallery(tmp_path / "val.html", scored_items(paths))
    page, thumbs = out.read_bytes(), sorted(thumbs_folder(out).glob("*.jpg"))
    import captioner.eval.gallery as gallery

    def dies_on_the_second(path, size, calls=[]):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(gallery, "thumbnail", dies_on_the_second)
    with pytest.raises(OSError):
        write_gallery(out, scored_items(paths))
    monkeypatch.undo()
    assert out.read_bytes() == page and sorted(thumbs_folder(out).glob("*.jpg")) == thumbs
    assert sorted(os.listdir(tmp_path)) == ["img", "val.html", "val_files"]


def test_gallery_in_headless_chromium_sorted_worst_cider_first(tmp_path):
    paths = photos(tmp_path / "img", 6)
    out = write_gallery(tmp_path / "val.html", scored_items(paths), title="flickr8k val",
                        totals={"BLEU-4": 21.3, "CIDEr": 53.5})
    with Browser(tmp_path / "profile", width=1280, height=1000) as browser:
        browser.open(out.as_uri())
        browser.wait_for("Array.from(document.images).every(i => i.complete)")
        cards = browser.evaluate(f"""Array.from(document.querySelectorAll('.card')).map(c => {{
            const img = c.querySelector('img'), cap = c.querySelector('.caption');
            return {{cider: parseFloat(c.dataset.cider), caption: cap.textContent,
                     loaded: img.complete && img.naturalWidth > 0, imgShown: ({VISIBLE_JS})(img),
                     captionShown: ({VISIBLE_JS})(cap)}};
        }})""")
        totals_shown = browser.evaluate(f"({VISIBLE_JS})(document.getElementById('totals'))")
        shot = browser.screenshot(tmp_path / "gallery.png")
        # the reader re-sorts: best CIDEr first
        browser.evaluate("const s = document.getElementById('sort'); s.value = 'CIDEr:desc';"
                         "s.dispatchEvent(new Event('change')); true")
        best_first = browser.evaluate("Array.from(document.querySelectorAll('.card')).map(c => parseFloat(c.dataset.cider))")
    assert [c["cider"] for c in cards] == sorted(c["cider"] for c in cards)  # worst first
    assert all(c["loaded"] and c["imgShown"] and c["captionShown"] for c in cards), cards
    assert totals_shown
    assert best_first == sorted(best_first, reverse=True)
    # the screenshot shows the photos' colours, not an empty page
    with Image.open(shot) as im:
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert all(any(sum(abs(a - b) for a, b in zip(c, want)) < 30 for c in colours) for want in COLOURS)


def test_caption_cli_html_on_the_example_photos(tmp_path):
    out = tmp_path / "examples.html"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "captioner", "caption", "examples/", "--n-best", "2",
                           "--html", str(out)], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert len(lines) == 6 and all(len(parts) == 3 for parts in lines)  # path, score, caption: 2 per image
    page = out.read_text()
    for _, _, caption in lines:
        assert caption in page
    assert len(list(thumbs_folder(out).glob("*.jpg"))) == 3
    assert "CIDEr" not in re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # no scores without references
    with Browser(tmp_path / "profile") as browser:
        browser.open(out.as_uri())
        browser.wait_for("Array.from(document.images).every(i => i.complete)")
        shown = browser.evaluate(f"""Array.from(document.querySelectorAll('.card')).map(c =>
            ({VISIBLE_JS})(c.querySelector('img')) && c.querySelector('img').naturalWidth > 0 &&
            ({VISIBLE_JS})(c.querySelector('.caption')))""")
        browser.screenshot(tmp_path / "examples.png")
    assert shown == [True, True, True]


def test_a_card_shows_the_tags_its_caption_used(tmp_path):
    photo = tmp_path / "broccoli.png"
    Image.new("RGB", (40, 30), (30, 140, 40)).save(photo)
    page = write_gallery(tmp_path / "g.html", [GalleryItem(photo, "a plate of broccoli",
                                                           tags=[("broccoli", 0.83), ("plate", 0.07)]),
                                               GalleryItem(photo, "a man")]).read_text()
    assert page.count("class=tags") == 1
    assert "tags: broccoli 0.83, plate 0.07" in page
