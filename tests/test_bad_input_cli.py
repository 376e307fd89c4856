"""The user's view of bad input: the real command-line tools, run as subprocesses, on broken files.

Each bad file gets exactly one `error: PATH: ...` line (or a counted warning for dataset problems), the
good files beside it are still processed, and nothing prints a traceback or hangs (every run has a
timeout). What load_image does with each kind of file, pixel by pixel, is tested in test_images.py
(including that an EXIF-rotated photo comes out upright); the per-format dataset cases in
test_records.py; checkpoints in test_checkpoint.py.
"""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.train import loop as training
from captioner.config import load_config
from captioner.errors import CaptionerError
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds: a hang fails the test instead of stalling the suite


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, errors="surrogateescape")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset root, feature cache, checkpoint) of a tiny model trained once for this module."""
    root = tmp_path_factory.mktemp("bad-input")
    data = make_flickr_layout(root / "flickr")
    cache = root / "cache"
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.root={data}", f"data.cache_dir={cache}",
                                                       "train.epochs=2"])
    training.fit(cfg, root / "run")
    return data, cache, root / "run" / "last.pt"


def gradient(w=64, h=48) -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2))


def make_good_images(folder: Path) -> list[Path]:
    """Odd but valid files: each must be captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16)[None].repeat(8, 0)).save(folder / "deep16.png")
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(folder / "cmyk.jpg")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    palette.save(folder / "palette.gif", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    gradient().save(folder / "rotated.jpg", exif=exif)
    Image.new("L", (1, 1), 7).save(folder / "one pixel.png")
    (folder / "a folder").mkdir(exist_ok=True)
    gradient().save(folder / "a folder" / "ünïcödé photo 犬.jpg")
    gradient().save(Path(os.fsdecode(bytes(folder) + b"/latin-1 caf\xe9.jpg")))  # a name that is not UTF-8
    return sorted(p for p in folder.rglob("*") if p.is_file())


def make_bad_images(folder: Path) -> dict[Path, str]:
    """Broken files -> what their one error line must say."""
    folder.mkdir(parents=True, exist_ok=True)
    gradient(200, 200).save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero bytes.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    # A real 1x1 PNG whose header claims 20000x20000 (CRC fixed up): decoding it would take 1.2 GB.
    Image.new("RGB", (1, 1)).save(folder / "bomb.png")
    png = bytearray((folder / "bomb.png").read_bytes())
    ihdr = png.index(b"IHDR")
    png[ihdr + 4: ihdr + 12] = struct.pack(">II", 20000, 20000)
    png[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr: ihdr + 17])))
    (folder / "bomb.png").write_bytes(bytes(png))
    return {folder / "truncated.jpg": "corrupt or truncated image", folder / "zero bytes.jpg": "empty file",
            folder / "text.jpg": "not an image file", folder / "bomb.png": "decompression bomb"}


def test_caption_cli_mixed_good_and_bad_images(trained, tmp_path):
    _, _, ckpt = trained
    good = make_good_images(tmp_path / "photos")
    bad = make_bad_images(tmp_path / "photos")  # in the same folder: expanding it meets every kind
    missing, empty = tmp_path / "no such photo.jpg", tmp_path / "empty folder"
    empty.mkdir()
    bad.update({missing: "no such file", empty: "holds no images"})
    # PYTHONIOENCODING makes stdout strict, as in a UTF-8 desktop locale, for the non-UTF-8 file name.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = run_cli("caption.py", tmp_path / "photos", missing, empty, "--checkpoint", ckpt, env=env)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == len(bad), errors
    for path, message in bad.items():
        [line] = [e for e in errors if e.startswith(f"error: {path}: ")]
        assert message in line, line
    captioned = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert sorted(captioned) == sorted(map(str, good))
    assert all(caption.strip() for caption in captioned.values())


@pytest.mark.parametrize("args,message", [
    (["--set", "model.hiden_dim=64"], "unknown config key model.hiden_dim (did you mean 'hidden_dim'?)"),
    (["--set", "train.lr=fast"], "train.lr: expected float, got 'fast'"),
    (["--set", "model.hidden_dim=-32"], "model.hidden_dim must be positive, got -32"),
])
def test_train_cli_bad_config_is_one_line(tmp_path, args, message):
    proc = run_cli("train.py", "--config", "configs/tiny.toml", "--run-dir", tmp_path / "run", *args)
    assert proc.returncode == 2 and proc.stderr == f"error: {message}\n", proc.stderr
    assert not (tmp_path / "run").exists()


def test_caption_cli_beam_size_0_is_one_line(trained):
    proc = run_cli("caption.py", "photo.jpg", "--beam-size", "0", "--checkpoint", trained[2])
    assert proc.returncode == 2 and proc.stderr == "error: --beam-size must be at least 1, got 0\n"


@pytest.mark.parametrize("override", [
    "encoder.batch_size=0",  # would be a DataLoader ValueError during feature extraction
    "encoder.num_workers=-1",  # DataLoader ValueError
    "train.weight_decay=-1",  # AdamW ValueError
    "train.select_metric=BLEU5",  # KeyError after the first epoch
    "train.eval_images=-1",  # would silently drop the last dev image
    "train.lr=inf",
    "train.warmup_steps=-5",
    "data.format=flikr",
])
def test_config_values_no_run_could_use_are_refused_up_front(override):
    with pytest.raises(CaptionerError, match=override.split("=")[0]):
        load_config(REPO / "configs" / "tiny.toml", [override])


def test_evaluate_cli_messy_dataset_files_are_counted_skips(trained, tmp_path):
    """CRLF, blank lines, a malformed line, non-UTF-8 bytes, a duplicate, captions of a missing image and a
    split file naming an unknown image: one warning per kind, and the rest is evaluated."""
    _, cache, ckpt = trained
    data = make_flickr_layout(tmp_path / "flickr")
    token = data / "Flickr8k.token.txt"
    lines = [line.encode() for line in token.read_text().splitlines()]
    lines[1] = lines[1].replace(b"\t", b" ")  # malformed: no tab between name and caption
    lines[2] = lines[2].replace(b"plain", b"pl\xe4in")  # Latin-1, not UTF-8
    lines += [b"", b"   ", lines[3], b"gone_0.jpg#0\ta photo that is not on disk ."]
    token.write_bytes(b"\r\n".join(lines))
    dev = data / "Flickr_8k.devImages.txt"
    dev.write_text(dev.read_text() + "unknown_9.jpg\n")

    proc = run_cli("evaluate.py", "--checkpoint", ckpt, "--data", data, "--split", "dev", "--cache-dir", cache,
                   "--no-meteor", "--json", tmp_path / "eval.json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and not error_lines(proc.stderr)
    for expected in ["not UTF-8, first at line 3", "1 malformed lines", "1 duplicate lines",
                     "captioned images not found", "gone_0.jpg", "have no captions", "unknown_9.jpg"]:
        [line] = [x for x in proc.stderr.splitlines() if expected in x]
        assert str(data) in line
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 4  # every real dev image scored


def coco_layout(root: Path, annotations: str) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    gradient().save(root / "val2017" / "000000000001.jpg")
    (root / "annotations" / "captions_val2017.json").write_text(annotations)
    return root / "annotations" / "captions_val2017.json"


@pytest.mark.parametrize("annotations,message", [
    ('{"images": [{"id": 1, "file_name": "000000000001.jpg"}], "annotations": [{"id": 1, "image_',
     "invalid JSON"),
    ('{"images": [{"id": 1, "file_name": "000000000001.jpg"}]}', 'no "annotations" list'),
])
def test_evaluate_cli_broken_coco_json_is_one_line(trained, tmp_path, annotations, message):
    path = coco_layout(tmp_path / "coco", annotations)
    proc = run_cli("evaluate.py", "--checkpoint", trained[2], "--data", tmp_path / "coco", "--split", "val",
                   "--no-meteor")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: {path}: ") and message in line, line
