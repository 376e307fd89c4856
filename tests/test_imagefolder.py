"""Photos in Hugging Face's imagefolder layout (metadata.jsonl or metadata.csv beside the images, splits in
train/, validation/, test/): detected, read, bad rows reported once naming the file, and the CLI trains,
evaluates and captions such a folder."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner.data import holdout
from captioner.data.records import detect_format, load_records
from captioner.errors import CaptionerError
from tiny_data import make_imagefolder_layout

REPO = Path(__file__).resolve().parents[1]


def jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 60, 30)).save(path, "JPEG")


def view(records, root):
    return [(r.image.relative_to(root).as_posix(), r.captions, r.split) for r in records]


def write_jsonl(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metadata.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_merge_by_file_name_and_lists_are_several_captions(tmp_path):
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        jpeg(tmp_path / name)
    write_jsonl(tmp_path, [{"file_name": "a.jpg", "text": "A dog runs ."},
                           {"file_name": "b.jpg", "text": ["Two kids play .", "Kids at the beach ."], "extra": 1},
                           {"file_name": "a.jpg", "text": "A brown dog on grass ."},
                           {"file_name": "sub/c.jpg", "text": "A cat sleeps ."}])
    assert detect_format(tmp_path) == "imagefolder"
    assert view(load_records(tmp_path), tmp_path) == [
        ("a.jpg", ("A dog runs .", "A brown dog on grass ."), "train"),
        ("b.jpg", ("Two kids play .", "Kids at the beach ."), "train"),
        ("sub/c.jpg", ("A cat sleeps .",), "train"),
    ]


def test_csv_layout_reads_the_same(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        jpeg(tmp_path / name)
    (tmp_path / "metadata.csv").write_text('file_name,text\r\na.jpg,"A dog, running ."\r\nb.jpg,Two kids .\r\n'
                                           "a.jpg,A brown dog .\r\n")
    assert view(load_records(tmp_path, format="imagefolder"), tmp_path) == [
        ("a.jpg", ("A dog, running .", "A brown dog ."), "train"), ("b.jpg", ("Two kids .",), "train")]


def test_split_folders_each_with_their_metadata(tmp_path):
    jpeg(tmp_path / "train" / "a.jpg")
    jpeg(tmp_path / "validation" / "b.jpg")
    jpeg(tmp_path / "test" / "c.jpg")
    write_jsonl(tmp_path / "train", [{"file_name": "a.jpg", "text": "one"}])
    write_jsonl(tmp_path / "validation", [{"file_name": "b.jpg", "text": "two"}])
    (tmp_path / "test" / "metadata.csv").write_text("file_name,text\nc.jpg,three\n")
    assert view(load_records(tmp_path), tmp_path) == [
        ("train/a.jpg", ("one",), "train"), ("validation/b.jpg", ("two",), "val"), ("test/c.jpg", ("three",), "test")]
    # A single metadata file at the top may name the split folders' images instead.
    for sub in ("train", "validation", "test"):
        for name in ("metadata.jsonl", "metadata.csv"):
            (tmp_path / sub / name).unlink(missing_ok=True)
    write_jsonl(tmp_path, [{"file_name": "train/a.jpg", "text": "one"}, {"file_name": "validation/b.jpg", "text": "two"},
                           {"file_name": "test/c.jpg", "text": "three"}])
    assert [r[2] for r in view(load_records(tmp_path), tmp_path)] == ["train", "val", "test"]


def test_found_one_folder_below(tmp_path):
    make_imagefolder_layout(tmp_path / "photos", "csv", per_colour=1)
    assert detect_format(tmp_path) == "imagefolder" and len(load_records(tmp_path)) == 4


def test_bad_rows_warn_once_per_kind_and_the_rest_is_read(tmp_path, caplog):
    for name in ("a.jpg", "b.jpg"):
        jpeg(tmp_path / name)
    path = write_jsonl(tmp_path, [
        {"file_name": "a.jpg", "text": "A dog ."},
        '{"file_name": "b.jpg", "text": "truncated',  # line 2: bad JSON
        {"file_name": "b.jpg"},  # line 3: no text
        {"text": "no file name"},  # line 4
        {"file_name": "b.jpg", "text": ["ok", 3]},  # line 5: not strings
        "[1, 2]",  # line 6: not an object
        {"file_name": "b.jpg", "text": "  "},  # line 7: empty caption
        {"file_name": "b.jpg", "text": []},  # line 8: no caption either
        {"file_name": "gone.jpg", "text": "An image that is not there ."},
        "",
        {"file_name": "b.jpg", "text": "A cat ."},
    ])
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    assert view(records, tmp_path) == [("a.jpg", ("A dog .",), "train"), ("b.jpg", ("A cat .",), "train")]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f'{path}: 5 malformed rows, not JSON with "file_name" and "text" (first: line 2, line 3, line 4, ...); '
        "skipped",
        f"{path}: 2 rows with an empty caption (first: line 7, line 8); skipped",
        f"{path}: 1 captioned images not found in {tmp_path}/ (first: gone.jpg); skipped",
    ]
    with pytest.raises(CaptionerError, match=r"5 malformed rows, not JSON .*\(first: line 2"):
        load_records(tmp_path, strict=True)


def test_csv_bad_header_bad_rows_and_empty_files(tmp_path, caplog):
    jpeg(tmp_path / "a.jpg")
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text("image,caption\na.jpg,A dog .\n")
    with pytest.raises(CaptionerError, match=r"metadata.csv: first line should be a header with the columns "
                                             r"file_name and text, got 'image,caption'"):
        load_records(tmp_path)
    csv_path.write_text("file_name,text\na.jpg,A dog .\na.jpg\na.jpg,,\nb.jpg,\n")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    assert view(records, tmp_path) == [("a.jpg", ("A dog .",), "train")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{csv_path}: 2 malformed rows, not as many fields as the header file_name,text (first: line 3, line 4); "
        "skipped",
        f"{csv_path}: 1 rows with an empty caption (first: line 5); skipped",
    ]
    csv_path.write_text("")
    with pytest.raises(CaptionerError, match="metadata.csv: no captions found"):
        load_records(tmp_path)
    csv_path.write_text("file_name,text\nb.jpg,\n")
    with pytest.raises(CaptionerError, match=r"no captions found \(0 malformed rows, 1 with an empty caption\)"):
        load_records(tmp_path)
    write_jsonl(tmp_path, [{"file_name": "a.jpg", "text": "x"}])
    with pytest.raises(CaptionerError, match="both metadata.jsonl and metadata.csv; keep one"):
        load_records(tmp_path)


def test_images_without_a_row_are_named_not_silently_dropped(tmp_path, caplog):
    for name in ("a.jpg", "b.jpg", "c.png"):
        jpeg(tmp_path / name)
    write_jsonl(tmp_path, [{"file_name": "a.jpg", "text": "A dog ."}])
    with caplog.at_level(logging.INFO, logger="captioner"):
        assert len(load_records(tmp_path)) == 1
    assert "2 images in" in caplog.text and "have no caption row, so are not used (first: b.jpg, c.png)" in caplog.text


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "captioner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("metadata,splits", [("jsonl", True), ("csv", False)])
def test_train_evaluate_and_caption_an_imagefolder(metadata, splits, tmp_path):
    data = make_imagefolder_layout(tmp_path / "photos", metadata, splits)
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_cli("train", "--config", "tiny", "--data", str(data), "--run-dir", str(run),
                   "--set", f"data.cache_dir={cache}", "--set", "train.epochs=2", "--set", "train.precision=fp32")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if splits:  # validation/ is the dev split
        assert "8 train and 4 val images" in proc.stderr and not (run / holdout.FILE_NAME).exists()
    else:  # all train: one image held out
        assert "has no val split: held out 1 of the 12 train images as dev" in proc.stderr
        assert "11 train and 1 val images" in proc.stderr
    ckpt = run / "best.pt"
    out = tmp_path / "eval.json"
    proc = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--split", "val", "--no-meteor",
                   "--beam-size", "1", "--cache-dir", str(cache), "--json", str(out), "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    images = sorted(Path(e["image"]).relative_to(data).as_posix() for e in result["per_image"])
    if splits:
        assert images == sorted(f"validation/{c}_0.jpg" for c in ("red", "green", "blue", "yellow"))
    else:
        assert images == holdout.read_listed(run / holdout.FILE_NAME)
    assert "CIDEr" in proc.stdout
    photos = sorted(data.rglob("*.jpg"))[:2]
    proc = run_cli("caption", *map(str, photos), "--checkpoint", str(ckpt), "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in photos]
    assert all(line.split("\t")[1].strip() for line in lines)


def test_split_folders_of_symbolic_links_keep_their_split(tmp_path):
    """The split is where the link is, not where it points: linked validation images are never trained on."""
    store, data = tmp_path / "store", tmp_path / "data"
    for split, names in (("train", ["a.jpg", "b.jpg"]), ("validation", ["c.jpg"])):
        (data / split).mkdir(parents=True)
        for name in names:
            jpeg(store / name)
            (data / split / name).symlink_to(store / name)
        write_jsonl(data / split, [{"file_name": name, "text": f"photo {name}"} for name in names])
    records = load_records(data)
    assert view(records, data) == [("train/a.jpg", ("photo a.jpg",), "train"),
                                   ("train/b.jpg", ("photo b.jpg",), "train"),
                                   ("validation/c.jpg", ("photo c.jpg",), "val")]


def test_duplicate_rows_are_counted_and_read_once(tmp_path, caplog):
    jpeg(tmp_path / "a.jpg")
    path = write_jsonl(tmp_path, [{"file_name": "a.jpg", "text": "A dog ."}, {"file_name": "a.jpg", "text": "A cat ."},
                                  {"file_name": "a.jpg", "text": "A dog ."}, {"file_name": "a.jpg", "text": "A dog ."}])
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(tmp_path)
    assert view(records, tmp_path) == [("a.jpg", ("A dog .", "A cat ."), "train")]
    assert [r.getMessage() for r in caplog.records] == [f"{path}: 2 duplicate rows ignored (first: line 3, line 4)"]
    path.unlink()
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text("file_name,text\na.jpg,A dog .\na.jpg,A dog .\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner"):
        assert load_records(tmp_path, strict=True)[0].captions == ("A dog .",)  # harmless: a warning in strict too
    assert "1 duplicate rows ignored (first: line 3)" in caplog.text


def test_a_file_name_leaving_the_dataset_folder_is_refused(tmp_path, caplog):
    data = tmp_path / "data"
    jpeg(data / "a.jpg")
    jpeg(tmp_path / "outside.jpg")
    path = write_jsonl(data, [
        {"file_name": "a.jpg", "text": "inside"},
        {"file_name": "../outside.jpg", "text": "a parent folder"},
        {"file_name": str(tmp_path / "outside.jpg"), "text": "an absolute path"},
        {"file_name": "/etc/passwd", "text": "a system file"},
        {"file_name": "sub/../a.jpg", "text": "inside after all"},
    ])
    with caplog.at_level(logging.WARNING, logger="captioner"):
        records = load_records(data)
    assert view(records, data) == [("a.jpg", ("inside", "inside after all"), "train")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 3 rows whose file_name leaves the dataset folder (first: line 2: ../outside.jpg, "
        f"line 3: {tmp_path / 'outside.jpg'}, line 4: /etc/passwd); skipped"]
    with pytest.raises(CaptionerError, match="3 rows whose file_name leaves the dataset folder"):
        load_records(data, strict=True)


def test_the_common_caption_column_names_are_read_and_others_named(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    write_jsonl(tmp_path, [{"file_name": "a.jpg", "caption": "A dog ."},
                           {"file_name": "b.jpg", "captions": ["A cat .", "A kitten ."]}])
    assert view(load_records(tmp_path), tmp_path) == [("a.jpg", ("A dog .",), "train"),
                                                      ("b.jpg", ("A cat .", "A kitten ."), "train")]
    write_jsonl(tmp_path, [{"file_name": "a.jpg", "description": "A dog ."}])
    with pytest.raises(CaptionerError, match=r"metadata.jsonl: no caption column in its rows \(keys: file_name, "
                                             r"description\); rename the column holding the captions to text"):
        load_records(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.jpg,A dog .\n")
    assert load_records(tmp_path)[0].captions == ("A dog .",)
    (tmp_path / "metadata.csv").write_text("image,description\na.jpg,A dog .\n")
    with pytest.raises(CaptionerError, match=r"got 'image,description'; rename the column holding the captions to "
                                             r"text \(or caption, captions\) and rename the column of image file "
                                             r"names to file_name"):
        load_records(tmp_path)


def test_captions_without_words_are_empty_and_overlong_ones_cut(tmp_path, caplog):
    jpeg(tmp_path / "a.jpg")
    long = " ".join(f"word{i}" for i in range(150))
    path = write_jsonl(tmp_path, [{"file_name": "a.jpg", "text": "A dog ."}, {"file_name": "a.jpg", "text": "!!! ..."},
                                  {"file_name": "a.jpg", "text": "\U0001F600\U0001F389"},
                                  {"file_name": "a.jpg", "text": long}])
    with caplog.at_level(logging.WARNING, logger="captioner"):
        [record] = load_records(tmp_path)
    assert record.captions == ("A dog .", " ".join(f"word{i}" for i in range(100)))
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 2 rows with an empty caption (first: line 2, line 3); skipped",
        f"{path}: 1 captions longer than 100 words (first: line 4); cut to 100 words"]
