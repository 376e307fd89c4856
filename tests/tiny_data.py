"""A tiny Flickr8k-layout dataset that tests build in a temporary folder.

Flat colours whose captions name the colour, so a small decoder on real EfficientNet-Lite0 features learns
them within a few epochs. Dev images are the `*_0.jpg` ones.
"""

from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 220), "yellow": (240, 230, 20)}


def make_flickr_layout(root: Path, per_colour: int = 3) -> Path:
    (root / "Images").mkdir(parents=True)
    tokens, train, dev = [], [], []
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            name = f"{colour}_{i}.jpg"
            shade = tuple(max(0, min(255, c + 10 * i)) for c in rgb)
            Image.new("RGB", (64, 48), shade).save(root / "Images" / name, quality=95)
            for k, text in enumerate([f"a plain {colour} square fills the whole picture",
                                      f"a plain {colour} square fills the picture",
                                      f"the whole picture is a plain {colour} square",
                                      f"a {colour} square fills the whole picture",
                                      f"a plain {colour} square fills the whole frame"]):
                tokens.append(f"{name}#{k}\t{text} .")
            (dev if i == 0 else train).append(name)
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    return root
