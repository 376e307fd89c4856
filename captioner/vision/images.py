"""The one place that opens image files.

Everything that reads a photo (feature extraction, the caption CLI, the server) goes through `load_image`
or `decode_image`, so every odd file on disk, upload or URL becomes either an upright 8-bit RGB image or a
one-line CaptionerError naming it.

Memory is bounded before anything is decoded: the header's pixel count (MAX_PIXELS) and aspect ratio
(MAX_ASPECT) are checked, so no later step (the encoder's resize to a 256-pixel short side, say) can
make a huge intermediate image from a small file. Given `min_side` (the encoder's resize), a large image is
decoded straight to a smaller scale: JPEG's DCT scaling (`Image.draft`), then `Image.reduce`, keeping at
least twice `min_side` on the short side so the encoder's own resize sees nearly the same pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import CaptionerError
from captioner.vision.download import download, is_url

# Suffixes `find_images` picks up when it expands a directory (compared lower-cased).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

# Refuse anything larger before decoding. 90 MP is far beyond any camera photo a captioner needs, and
# a 20000x20000 RGB image would otherwise allocate 1.2 GB. Checked from the header (PIL's `open` is lazy).
MAX_PIXELS = 90_000_000

# Refuse images whose long side is more than this many times the short side. A 1x200000 PNG is 862 bytes
# and 200,000 pixels, well under MAX_PIXELS, yet resizing its short side to 256 would make a 256 x 51,200,000
# image (39 GB). At 20:1 the encoder's resize makes at most 256 x 5120; panoramas are 2:1 to 10:1.
MAX_ASPECT = 20

# Modes that mean "there is an alpha channel" (or a palette/transparency key that becomes one).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open, fully decode and return `path` as an upright RGB image; CaptionerError on any bad file.

    `path` may be an http(s) URL (a str): the image is downloaded (captioner.vision.download) and
    checked as a file is. min_side: decode a large image at a reduced scale (see the module's docstring).
    """
    if isinstance(path, str) and is_url(path):
        return decode_image(download(path), path, min_side=min_side)
    path = Path(path)
    _check_is_file(path)
    return _decode(lambda: Image.open(path), path, min_side=min_side)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """The bytes of an image file (an upload, say) -> an upright RGB image, with the same checks as
    `load_image` and nothing written to disk; CaptionerError naming `name` on anything bad."""
    if not data:
        raise CaptionerError(f"{name}: empty file (0 bytes)")
    return _decode(lambda: Image.open(io.BytesIO(data)), name, max_pixels, min_side)


def peek_image(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, mode) from the header of an image file's bytes, after the checks `decode_image`
    makes before decoding; CaptionerError as it. Decodes nothing: a server can reserve memory first."""
    if not data:
        raise CaptionerError(f"{name}: empty file (0 bytes)")
    return _guarded(lambda: _peek(Image.open(io.BytesIO(data)), name, max_pixels), name)


def decoded_bytes(width: int, height: int, mode: str, min_side: int | None = None) -> int:
    """About the most memory `decode_image(..., min_side=min_side)` holds at once for such an image. PIL
    keeps RGB and most modes in 4 bytes a pixel; an image decoded whole is copied once more (upright), one
    shrunk is not; modes that `Image.reduce` cannot shrink (palettes, 16-bit) are converted first."""
    copies = 1 if _reduction(width, height, min_side) > 1 else 2
    return width * height * 4 * (copies + (mode not in _REDUCIBLE_MODES))


def check_size(width: int, height: int, name, max_pixels: int = MAX_PIXELS) -> None:
    """CaptionerError unless a width x height image is within MAX_PIXELS and MAX_ASPECT."""
    if width < 1 or height < 1:
        raise CaptionerError(f"{name}: image is {width}x{height} pixels: it holds no pixels")
    if width * height > max_pixels:
        raise CaptionerError(f"{name}: image is {width}x{height} pixels, more than the "
                             f"{max_pixels:,} allowed (possible decompression bomb)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise CaptionerError(f"{name}: image is {width}x{height} pixels, a strip more than {MAX_ASPECT} times "
                             f"as long as it is wide; refused (resizing it would take too much memory)")


# Modes whose pixels `Image.reduce` may average directly (not palette indexes, not 1-bit or 16-bit ones).
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                              "I", "F"})


def _peek(img: Image.Image, name, max_pixels: int) -> tuple[int, int, str]:
    with img:
        width, height = img.size  # header only: nothing decoded yet
        check_size(width, height, name, max_pixels)
        return width, height, img.mode


def _reduction(width: int, height: int, min_side: int | None) -> int:
    """The whole factor to shrink a width x height image by, keeping at least 2 * min_side on its short side."""
    return max(1, min(width, height) // (2 * min_side)) if min_side else 1


def _decode(opener, name, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    def decode() -> Image.Image:
        with opener() as img:
            width, height = img.size  # header only: nothing decoded yet
            check_size(width, height, name, max_pixels)
            factor = _reduction(width, height, min_side)
            if factor > 1 and img.format == "JPEG":
                # DCT scaling: decoded at 1/2, 1/4 or 1/8 of the size at once, never whole
                img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else "RGB",
                          (width // factor, height // factor))
            img.load()  # decode everything now so truncation surfaces here, not in a later step
            factor = _reduction(*img.size, min_side)
            if factor > 1:
                averaged = img.mode in _REDUCIBLE_MODES and "transparency" not in img.info
                img = (img if averaged else to_rgb(img, name)).reduce(factor)
            return ImageOps.exif_transpose(img)  # a decoded copy, independent of the file

    img = _guarded(decode, name)
    return to_rgb(img, name)


def _guarded(work, name):
    """Run `work` (which opens and reads an image), turning every way a file can be bad into one line."""
    try:
        # PIL signals a possible decompression bomb with a warning below 2x its own limit and an error
        # above; turn the warning into an error too so neither slips through as a huge allocation.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return work()
    except CaptionerError:
        raise
    except MemoryError:
        raise CaptionerError(f"{name}: not enough memory to decode this image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CaptionerError(f"{name}: refused as a possible decompression bomb ({_one_line(e)})") from None
    except PermissionError:
        raise CaptionerError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise CaptionerError(f"{name}: not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated JPEG/PNG, bad CRCs, broken EXIF, unsupported compression...
        raise CaptionerError(f"{name}: corrupt or truncated image ({_one_line(e)})") from None


def thumbnail(path: str | os.PathLike, size: int = 256) -> Image.Image:
    """A small upright RGB copy of the image file at `path`, at most `size` pixels on its longer side.

    JPEGs are decoded at a reduced scale straight away (PIL's draft mode), so thumbnailing thousands of
    photos costs a fraction of decoding them whole. CaptionerError on a bad file, as `load_image`.
    """
    path = Path(path)
    _check_is_file(path)

    def opener():
        img = Image.open(path)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        return img

    img = _decode(opener, path)
    img.thumbnail((size, size))
    return img


def as_image(obj, name: str = "image", min_side: int | None = None) -> Image.Image:
    """What a Python caller may hand the captioner -> an RGB PIL image; CaptionerError naming `name`.

    Accepted: a path (str or os.PathLike), an http(s) URL (a str), a PIL image, an (H, W, 3) / (H, W)
    uint8 numpy array, or a (3, H, W) tensor (uint8 0..255, or floating point in [0, 1], as torchvision's
    ToTensor makes it). Each is held to MAX_PIXELS and MAX_ASPECT.
    """
    if isinstance(obj, (str, os.PathLike)):
        return load_image(obj, min_side=min_side)
    if isinstance(obj, Image.Image):
        check_size(*obj.size, name)
        try:
            obj.load()
        except (OSError, ValueError, EOFError) as e:
            raise CaptionerError(f"{name}: the PIL image cannot be decoded ({_one_line(e)})") from None
        return to_rgb(obj, name)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        if len(obj.shape) == 3:
            check_size(obj.shape[2], obj.shape[1], name)
        return _from_chw_tensor(obj, name)
    if isinstance(obj, np.ndarray):
        if obj.ndim in (2, 3):
            check_size(obj.shape[1], obj.shape[0], name)
        return _from_hwc_array(obj, name)
    raise CaptionerError(f"{name}: cannot caption a {type(obj).__name__}; give a path, a PIL image, an "
                         f"HWC uint8 numpy array or a CHW tensor")


def _from_hwc_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise CaptionerError(f"{name}: numpy array of dtype {array.dtype}; expected uint8 (0..255), HWC")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise CaptionerError(f"{name}: numpy array of shape {tuple(array.shape)}; expected (H, W, 3) "
                             f"RGB, (H, W, 4) RGBA or (H, W) grayscale")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise CaptionerError(f"{name}: numpy array of shape {tuple(array.shape)} holds no pixels")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)), name)


def _from_chw_tensor(tensor, name: str) -> Image.Image:
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise CaptionerError(f"{name}: tensor of shape {shape}; expected (3, H, W) RGB or (1, H, W) "
                             f"grayscale (a batch is a list of tensors)")
    array = tensor.detach().cpu().numpy()
    if array.dtype != np.uint8:
        if array.dtype.kind != "f":
            raise CaptionerError(f"{name}: tensor of dtype {tensor.dtype}; expected uint8 or floating point")
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise CaptionerError(f"{name}: floating-point tensor with values outside [0, 1] (or not finite); "
                                 f"expected an image as ToTensor makes it, not a normalised one")
        array = np.rint(array * 255.0).astype(np.uint8)
    return _from_hwc_array(np.moveaxis(array, 0, -1), name)


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


def find_images(paths: list[str | os.PathLike]) -> list[Path | str]:
    """Expand `paths` into image files: directories recursively (sorted, by suffix), files as given,
    http(s) URLs kept as the str they are."""
    found: list[Path | str] = []
    for arg in paths:
        if isinstance(arg, str) and is_url(arg):
            found.append(arg)  # downloaded when it is read
            continue
        path = Path(arg)
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
