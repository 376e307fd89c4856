"""The one place that opens image files.

Everything that reads a photo (feature extraction, the caption CLI) goes through `load_image`, so every
odd file on disk becomes either an upright 8-bit RGB image or a one-line CaptionerError naming the path.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import CaptionerError

# Suffixes `find_images` picks up when it expands a directory (compared lower-cased).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

# Refuse anything larger before decoding. 90 MP is far beyond any camera photo a captioner needs, and
# a 20000x20000 RGB image would otherwise allocate 1.2 GB. Checked from the header (PIL's `open` is lazy).
MAX_PIXELS = 90_000_000

# Modes that mean "there is an alpha channel" (or a palette/transparency key that becomes one).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and return `path` as an upright RGB image; CaptionerError on any bad file."""
    path = Path(path)
    _check_is_file(path)
    try:
        # PIL signals a possible decompression bomb with a warning below 2x its own limit and an error
        # above; turn the warning into an error too so neither slips through as a huge allocation.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size  # header only: nothing decoded yet
                if width * height > MAX_PIXELS:
                    raise CaptionerError(f"{path}: image is {width}x{height} pixels, more than the "
                                         f"{MAX_PIXELS:,} allowed (possible decompression bomb)")
                img.load()  # decode everything now so truncation surfaces here, not in a later step
                img = ImageOps.exif_transpose(img)  # returns a decoded copy, independent of the file
    except CaptionerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CaptionerError(f"{path}: refused as a possible decompression bomb ({_one_line(e)})") from None
    except PermissionError:
        raise CaptionerError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise CaptionerError(f"{path}: not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated JPEG/PNG, bad CRCs, broken EXIF, unsupported compression...
        raise CaptionerError(f"{path}: corrupt or truncated image ({_one_line(e)})") from None
    return to_rgb(img, path)


def to_rgb(img: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, high bit depths are rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # P with a transparent index, L/RGB with a tRNS key, RGBA...: go through RGBA, then paste on white
        # so transparent areas look like the page a viewer would show, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16-bit PNG/TIFF (I;16*), 32-bit int (I) or float (F). PIL's own convert("L") clips at 255, which
        # turns a 16-bit photo all white; rescale to 8 bits instead.
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV
    except ValueError as e:
        raise CaptionerError(f"{path}: cannot convert image mode {mode} to RGB ({_one_line(e)})") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) integer or float samples -> (H, W) uint8, keeping the file's intended brightness."""
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255 exactly
    elif mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    elif values.size and values.min() >= 0.0 and values.max() <= 255.0:
        scaled = values  # already 8-bit range
    elif mode == "I" and values.size and values.min() >= 0.0 and values.max() <= 65535.0:
        scaled = values / 257.0  # 16-bit PNGs that older Pillow versions open as mode I
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))  # unknown range: stretch to fit
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand `paths` into image files: directories recursively (sorted, by suffix), files as given."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise CaptionerError(f"{path}: directory holds no images "
                                     f"(looked for {' '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend(images)
        elif path.exists():
            found.append(path)  # named explicitly: trust the user, load_image will complain if it is not one
        else:
            raise CaptionerError(f"{path}: no such file or directory")
    # The same file named twice (or via a file and its directory) is captioned once.
    return list(dict.fromkeys(found))


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise CaptionerError(f"{path}: no such file")
    if path.is_dir():
        raise CaptionerError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise CaptionerError(f"{path}: empty file (0 bytes)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
