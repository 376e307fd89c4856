"""Dataset readers: every layout of the same data gives the same records; bad input is reported, once,
naming the file; real Flickr8k and coco-mini read as documented."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from captioner.data.records import FORMATS, detect_format, hash_split, load_records, normalize_split, trim_caption
from captioner.data.vocab import tokenize
from captioner.errors import CaptionerError

# A tiny dataset: image -> captions, and the official split of each (None: in no split file).
CAPTIONS = {
    "1001_a.jpg": ["A dog runs .", "A brown dog is running on grass .", 'A dog, "happy", runs .'],
    "1002_b.jpg": ["Two children play in the sand .", "Kids at the beach ."],
    "1003_c.jpg": ["A man rides a bike .", "A cyclist on a road ."],
    "1004_d.jpg": ["A cat sleeps .", "A cat sleeps ."],  # same text twice: two annotators, both kept
    "1005_e.jpg": ["A red car .", "A car parked on a street ."],
    "1006_f.jpg": ["A bird on a branch .", "A small bird ."],
}
SPLITS = {"1001_a.jpg": "train", "1002_b.jpg": "train", "1003_c.jpg": "train", "1004_d.jpg": "val",
          "1005_e.jpg": "test", "1006_f.jpg": None}
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}


def view(records):
    """What a record says, without the absolute path (which differs from layout to layout)."""
    return [(r.image.name, r.captions, r.split) for r in records]


def expected(with_splits=True):
    rows = []
    for name, caps in CAPTIONS.items():
        split = SPLITS[name] if with_splits else hash_split(name)
        if split is not None:
            rows.append((name, tuple(caps), split))
    order = ("train", "val", "test")
    return sorted(rows, key=lambda r: (order.index(r[2]), r[0]))


def jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 60, 30)).save(path, "JPEG")


def token_lines(captions=CAPTIONS):
    return [f"{name}#{k}\t{c}" for name, caps in captions.items() for k, c in enumerate(caps)]


def write_flickr(root: Path, image_dir="Flicker8k_Dataset", text_dir="Flickr8k_text", captions=CAPTIONS,
                 splits=SPLITS, split_files=True) -> Path:
    """The official zips' layout (or the flat one with text_dir=".", image_dir="Images")."""
    for name in captions:
        jpeg(root / image_dir / name)
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_text("\n".join(token_lines(captions)) + "\n")
    if split_files:
        for split, filename in SPLIT_FILES.items():
            names = [n for n, s in splits.items() if s == split]
            (text / filename).write_text("\n".join(names))  # no final newline, as distributed
    return text / "Flickr8k.token.txt"


def write_kaggle(root: Path, captions=CAPTIONS) -> Path:
    for name in captions:
        jpeg(root / "Images" / name)
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name, caps in captions.items():
            w.writerows([name, c] for c in caps)
    return root / "captions.txt"


def write_karpathy(root: Path) -> Path:
    images = []
    for name, caps in CAPTIONS.items():
        jpeg(root / "Images" / name)
        if SPLITS[name] is not None:
            split = {"val": "val", "test": "test"}.get(SPLITS[name], "train")
            if name == "1002_b.jpg":
                split = "restval"  # Karpathy's extra training images
            images.append({"filename": name, "split": split, "imgid": len(images),
                           "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]})
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return path


def write_coco(root: Path) -> dict[str, Path]:
    """captions_train2017.json (train images) and captions_val2017.json (val images)."""
    paths = {}
    ann_id = 1
    for split in ("train", "val"):
        images, annotations = [], []
        for i, (name, caps) in enumerate(CAPTIONS.items()):
            if SPLITS[name] != split:
                continue
            jpeg(root / f"{split}2017" / name)
            images.append({"id": i + 1, "file_name": name, "width": 8, "height": 8, "license": 4})
            for c in caps:
                annotations.append({"id": ann_id, "image_id": i + 1, "caption": c})
                ann_id += 1
        data = {"info": {"description": "test"}, "licenses": [{"id": 4, "name": "CC BY"}],
                "images": images, "annotations": annotations}
        path = root / "annotations" / f"captions_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        paths[split] = path
    return paths


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "captioner" and r.levelno == logging.WARNING]


# --- every layout, same records --------------------------------------------------------------------------


def test_official_zip_layout(tmp_path):
    write_flickr(tmp_path)
    assert detect_format(tmp_path) == "flickr"
    records = load_records(tmp_path)
    assert view(records) == expected()
    assert all(r.image.is_absolute() and r.image.is_file() for r in records)
    assert records[0].image.parent.name == "Flicker8k_Dataset"


def test_flat_layout_matches_official(tmp_path):
    write_flickr(tmp_path / "zip")
    write_flickr(tmp_path / "flat", image_dir="Images", text_dir=".")
    assert view(load_records(tmp_path / "flat")) == view(load_records(tmp_path / "zip")) == expected()


def test_kaggle_layout_uses_hash_split(tmp_path):
    write_kaggle(tmp_path)
    assert detect_format(tmp_path) == "kaggle"
    # Captions with commas and quotes survive the CSV; identical captions of one image are both kept.
    assert view(load_records(tmp_path)) == expected(with_splits=False)


def test_karpathy_layout_matches_official(tmp_path):
    write_karpathy(tmp_path)
    assert detect_format(tmp_path) == "karpathy"
    assert view(load_records(tmp_path)) == expected()  # restval became train


def test_coco_layout_matches_official(tmp_path):
    write_coco(tmp_path)
    assert detect_format(tmp_path) == "coco"
    records = load_records(tmp_path)
    assert view(records) == [row for row in expected() if row[2] in ("train", "val")]
    assert {r.image.parent.name for r in records} == {"train2017", "val2017"}


def test_flickr_without_split_files_uses_hash_split(tmp_path):
    write_flickr(tmp_path, split_files=False)
    assert view(load_records(tmp_path)) == expected(with_splits=False)


def test_splits_filter_and_order(tmp_path):
    write_flickr(tmp_path)
    assert {r.split for r in load_records(tmp_path, splits=["dev"])} == {"val"}
    assert [r.split for r in load_records(tmp_path, splits=["test", "training"])] == ["train"] * 3 + ["test"]
    with pytest.raises(CaptionerError, match="unknown split 'holdout'"):
        load_records(tmp_path, splits=["holdout"])


# --- detection ---------------------------------------------------------------------------------------------


def test_detect_one_level_up(tmp_path):
    write_flickr(tmp_path / "flickr8k")
    assert detect_format(tmp_path) == "flickr"
    assert view(load_records(tmp_path)) == expected()


def test_detect_nothing_explains_what_was_looked_for(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(CaptionerError) as e:
        detect_format(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "no dataset found" in message
    for looked_for in ("Flickr8k.token.txt", "captions.txt", "dataset_*.json", "annotations/captions_*.json"):
        assert looked_for in message
    assert "\n" not in message


def test_detect_several_datasets_below(tmp_path):
    write_flickr(tmp_path / "one")
    write_kaggle(tmp_path / "two")
    with pytest.raises(CaptionerError, match="several datasets found.*one, two"):
        detect_format(tmp_path)


def test_karpathy_preferred_over_coco_and_format_forcing(tmp_path):
    write_coco(tmp_path)
    write_karpathy(tmp_path)
    assert detect_format(tmp_path) == "karpathy"
    assert any(r.split == "test" for r in load_records(tmp_path))
    forced = load_records(tmp_path, format="coco")
    assert {r.split for r in forced} == {"train", "val"}
    assert all(r.image.parent.name.endswith("2017") for r in forced)
    with pytest.raises(CaptionerError, match="unknown dataset format 'flickr9k'"):
        load_records(tmp_path, format="flickr9k")
    assert set(FORMATS) == {"flickr", "kaggle", "karpathy", "coco", "imagefolder"}


def test_forced_format_that_is_absent_names_the_file(tmp_path):
    write_kaggle(tmp_path)
    with pytest.raises(CaptionerError, match="no Flickr token file"):
        load_records(tmp_path, format="flickr")


def test_missing_root(tmp_path):
    with pytest.raises(CaptionerError, match="does not exist"):
        load_records(tmp_path / "nope")


# --- splits --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, split", [("train", "train"), ("restval", "train"), ("dev", "val"),
                                          ("Validation", "val"), ("val", "val"), ("test ", "test")])
def test_normalize_split(name, split):
    assert normalize_split(name) == split


def test_normalize_split_unknown():
    with pytest.raises(CaptionerError, match="unknown split 'eval'"):
        normalize_split("eval")


def test_hash_split_is_stable_and_proportional():
    names = [f"{i:06d}_x.jpg" for i in range(4000)]
    counts = Counter(hash_split(n) for n in names)
    assert 0.10 < counts["val"] / 4000 < 0.15 and 0.10 < counts["test"] / 4000 < 0.15
    assert Counter(hash_split(n, val_fraction=0.5, test_fraction=0.0) for n in names)["test"] == 0
    # Same answer in another process with another hash seed: not built on hash().
    code = ("from captioner.data.records import hash_split; "
            "print(''.join(hash_split(f'{i}.jpg')[1] for i in range(200)))")
    env = dict(os.environ, PYTHONHASHSEED="123")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == "".join(hash_split(f"{i}.jpg")[1] for i in range(200))
    with pytest.raises(CaptionerError):
        hash_split("a.jpg", val_fraction=0.6, test_fraction=0.5)


# --- bad input: reported once, naming the file ---------------------------------------------------------------


def test_caption_for_missing_image_warns_once_and_strict_raises(tmp_path, caplog):
    token = write_flickr(tmp_path)
    with open(token, "a") as f:
        f.writelines(f"ghost_{i}.jpg.1#0\tA ghost .\n" for i in range(5))
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert view(load_records(tmp_path)) == expected()
    [message] = warnings_of(caplog)
    assert str(token) in message and "5 captioned images not found" in message
    assert "ghost_0.jpg.1, ghost_1.jpg.1, ghost_2.jpg.1" in message
    with pytest.raises(CaptionerError, match=r"Flickr8k.token.txt: 5 captioned images not found.*ghost_0"):
        load_records(tmp_path, strict=True)


def test_split_file_naming_uncaptioned_image(tmp_path, caplog):
    write_flickr(tmp_path)
    train = tmp_path / "Flickr8k_text" / SPLIT_FILES["train"]
    train.write_text(train.read_text() + "\n9999_nocaption.jpg\n")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert view(load_records(tmp_path)) == expected()
    [message] = warnings_of(caplog)
    assert str(train) in message and "1 images named here have no captions" in message
    assert "9999_nocaption.jpg" in message
    with pytest.raises(CaptionerError, match="trainImages.txt: 1 images named here"):
        load_records(tmp_path, strict=True)


def test_token_file_whitespace_variants(tmp_path, caplog):
    """CRLF, blank lines, trailing whitespace and no final newline read the same as a clean file."""
    token = write_flickr(tmp_path)
    lines = [line + "  " for line in token_lines()]
    lines.insert(3, "")
    lines.insert(5, "   ")
    token.write_bytes("\r\n".join(lines).encode())
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert view(load_records(tmp_path)) == expected()
    assert warnings_of(caplog) == []


def test_duplicate_lines_dropped_and_counted(tmp_path, caplog):
    token = write_flickr(tmp_path)
    token.write_text(token.read_text() + "\n".join(token_lines()[:2]) + "\n")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert view(load_records(tmp_path)) == expected()
    [message] = warnings_of(caplog)
    assert "2 duplicate lines ignored" in message and "1001_a.jpg" in message and str(token) in message


@pytest.mark.parametrize("caption", ["...", "\U0001F600 \U0001F389", "a", "_", "__x__", "'-'", "1.5", "café",
                                     "\uff01\uff01", "\u0663", " - " * 80, "!" * 250 + "x", "x" * 300])
def test_a_caption_has_words_exactly_when_the_tokenizer_finds_some(caption):
    kept, cut = trim_caption(caption)
    assert bool(kept) == bool(tokenize(caption)) and not cut


@pytest.mark.parametrize("write", [write_flickr, write_coco])
def test_captions_without_words_are_dropped_and_overlong_ones_cut_in_every_layout(tmp_path, caplog, write):
    long = " ".join(f"w{i}," for i in range(300))  # a paragraph pasted into one caption
    odd = {"1001_a.jpg": ["...", "A dog runs ."], "1004_d.jpg": ["\U0001F436 !!", "A cat sleeps .", long]}
    captions = {name: odd.get(name, caps) for name, caps in CAPTIONS.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CAPTIONS, "1001_a.jpg", captions["1001_a.jpg"])
        mp.setitem(CAPTIONS, "1004_d.jpg", captions["1004_d.jpg"])
        write(tmp_path)
        with caplog.at_level(logging.WARNING, logger="captioner"):
            records = {r.image.name: r.captions for r in load_records(tmp_path)}
    assert records["1001_a.jpg"] == ("A dog runs .",)
    assert records["1004_d.jpg"] == ("A cat sleeps .", " ".join(f"w{i}," for i in range(100)))
    assert warnings_of(caplog) == [
        f"{tmp_path}: 2 captions with no words (blank, or only punctuation or emoji) (first: 1001_a.jpg, "
        "1004_d.jpg); skipped",
        f"{tmp_path}: 1 captions longer than 100 words (first: 1004_d.jpg); cut to 100 words"]
    with pytest.raises(CaptionerError, match="2 captions with no words"):
        load_records(tmp_path, strict=True)


def test_malformed_lines_warn_with_first_line_number(tmp_path, caplog):
    token = write_flickr(tmp_path)
    lines = token_lines()
    lines.insert(2, "1001_a.jpg#9 no tab here")
    lines.insert(6, "1001_a.jpg\tno hash mark")
    token.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert view(load_records(tmp_path)) == expected()
    [message] = warnings_of(caplog)
    assert str(token) in message and "2 malformed lines" in message and "first: line 3, line 7" in message
    with pytest.raises(CaptionerError, match="2 malformed lines"):
        load_records(tmp_path, strict=True)


def test_non_utf8_bytes_replaced_with_one_warning(tmp_path, caplog):
    token = write_flickr(tmp_path)
    lines = [line.encode() for line in token_lines()]
    lines[4] = lines[4].replace(b"Kids", b"K\xefds")  # Latin-1 "i" with diaeresis
    lines[5] += b" \xff"
    token.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    [message] = warnings_of(caplog)
    assert str(token) in message and "not UTF-8, first at line 5" in message
    b = next(r for r in records if r.image.name == "1002_b.jpg")
    assert b.captions[1] == "K\ufffdds at the beach ."
    with pytest.raises(CaptionerError, match="not UTF-8, first at line 5"):
        load_records(tmp_path, strict=True)


def test_empty_token_file(tmp_path):
    token = write_flickr(tmp_path)
    token.write_text("")
    with pytest.raises(CaptionerError, match=f"{token}: no captions found"):
        load_records(tmp_path)


def test_kaggle_bad_header_and_empty(tmp_path):
    path = write_kaggle(tmp_path)
    path.write_text("image,caption\n")
    with pytest.raises(CaptionerError, match=f"{path}: no captions found"):
        load_records(tmp_path, format="kaggle")
    path.write_text("file,text\na.jpg,x\n")
    with pytest.raises(CaptionerError, match=f"{path}: first line should be the header"):
        load_records(tmp_path, format="kaggle")


def test_kaggle_missing_image_and_unquoted_comma(tmp_path, caplog):
    path = write_kaggle(tmp_path)
    with open(path, "a") as f:
        f.write("1006_f.jpg,A bird, small and grey .\n")
        f.write("gone.jpg,Nothing here .\n")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    [message] = warnings_of(caplog)
    assert str(path) in message and "1 captioned images not found" in message and "gone.jpg" in message
    f = next(r for r in records if r.image.name == "1006_f.jpg")
    assert f.captions[-1] == "A bird, small and grey ."


def test_karpathy_truncated_json(tmp_path):
    path = write_karpathy(tmp_path)
    path.write_text(path.read_text()[:-40])
    with pytest.raises(CaptionerError, match=f"{path}: invalid JSON"):
        load_records(tmp_path)
    path.write_text(json.dumps({"pictures": []}))
    with pytest.raises(CaptionerError, match=f'{path}: no "images" list'):
        load_records(tmp_path)


def test_karpathy_bad_split_and_missing_image(tmp_path, caplog):
    path = write_karpathy(tmp_path)
    (tmp_path / "Images" / "1001_a.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    assert "1001_a.jpg" not in [r.image.name for r in records]
    [message] = warnings_of(caplog)
    assert str(path) in message and "1 captioned images not found" in message and "1001_a.jpg" in message
    data = json.loads(path.read_text())
    data["images"][0]["split"] = "holdout"
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match=f"{path}: image entry 0: unknown split 'holdout'"):
        load_records(tmp_path)


def test_coco_truncated_or_without_annotations(tmp_path):
    paths = write_coco(tmp_path)
    train = paths["train"]
    text = train.read_text()
    train.write_text(text[: len(text) // 2])
    with pytest.raises(CaptionerError, match=f"{train}: invalid JSON"):
        load_records(tmp_path)
    data = json.loads(text)
    del data["annotations"]
    train.write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match=f'{train}: no "annotations" list'):
        load_records(tmp_path)


def test_coco_partial_download(tmp_path, caplog, capsys):
    paths = write_coco(tmp_path)
    (tmp_path / "train2017" / "1002_b.jpg").unlink()
    (tmp_path / "train2017" / "1003_c.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    assert [r.image.name for r in records] == ["1001_a.jpg", "1004_d.jpg"]
    [message] = warnings_of(caplog)
    assert str(paths["train"]) in message and "2 captioned images not found" in message
    assert "1002_b.jpg, 1003_c.jpg" in message
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are silenced
    with pytest.raises(CaptionerError, match="2 captioned images not found"):
        load_records(tmp_path, strict=True)


# --- real data ----------------------------------------------------------------------------------------------

BAD_FLICKR_ENTRY = "2258277193_586949ec62.jpg.1"


@pytest.fixture(scope="module")
def flickr8k_records(flickr8k_root):
    return load_records(flickr8k_root)


@pytest.mark.realdata
def test_real_flickr8k(flickr8k_root, caplog):
    with caplog.at_level(logging.INFO, logger="captioner"):
        records = load_records(flickr8k_root)
    splits = Counter(r.split for r in records)
    assert splits == {"train": 6000, "val": 1000}
    assert all(len(r.captions) == 5 for r in records)
    assert len({r.image for r in records}) == 7000
    # The token file's one bad entry is named once, as a known bad entry, and is no "not found" warning.
    assert [m for m in warnings_of(caplog) if "not found" in m] == []
    named = [r.getMessage() for r in caplog.records if BAD_FLICKR_ENTRY in r.getMessage()]
    assert len(named) == 1 and "a known bad entry" in named[0]


@pytest.mark.realdata
def test_real_coco_mini(coco_mini_root):
    records = load_records(coco_mini_root)
    data = json.loads((coco_mini_root / "annotations" / "captions_train2017.json").read_text())
    per_image = Counter(a["image_id"] for a in data["annotations"])
    names = {img["file_name"]: per_image[img["id"]] for img in data["images"]}
    assert len(records) == 80 and {r.split for r in records} == {"train"}
    assert {r.image.name: len(r.captions) for r in records} == names


@pytest.mark.realdata
def test_real_flickr8k_subset_in_other_layouts(flickr8k_root, flickr8k_records, tmp_path):
    """~20 real images with their real token lines, laid out as the official zips and as Kaggle's copy,
    read the same as the flat layout."""
    by_split = {"train": [], "val": []}
    for r in flickr8k_records:
        by_split[r.split].append(r)
    chosen = by_split["train"][:15] + by_split["val"][:5]
    # An image whose two annotators wrote the same sentence: must stay five captions in every layout.
    chosen += [r for r in flickr8k_records if r.image.name == "2305437797_e6c3460190.jpg"]
    names = {r.image.name for r in chosen}
    token = [line for line in (flickr8k_root / "Flickr8k.token.txt").read_text().split("\n")
             if line.split("#", 1)[0] in names]

    zipped = tmp_path / "zip"
    text = zipped / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "Flickr8k.token.txt").write_text("\n".join(token) + "\n")
    for split, filename in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt")):
        (text / filename).write_text("\n".join(r.image.name for r in chosen if r.split == split))
    kaggle = tmp_path / "kaggle"
    for r in chosen:
        for folder in (zipped / "Flicker8k_Dataset", kaggle / "Images"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(r.image, folder / r.image.name)
    with open(kaggle / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for line in token:
            key, caption = line.split("\t")
            w.writerow([key.split("#")[0], caption])

    flat = sorted(view(chosen))
    assert sorted(view(load_records(zipped))) == flat
    assert sorted((n, c) for n, c, _ in view(load_records(kaggle))) == [(n, c) for n, c, _ in flat]
    assert all(len(r.captions) == 5 for r in load_records(kaggle))
