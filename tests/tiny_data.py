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


def _captions(colour: str) -> list[str]:
    return [f"a plain {colour} square fills the whole picture", f"a plain {colour} square fills the picture",
            f"the whole picture is a plain {colour} square", f"a {colour} square fills the whole picture",
            f"a plain {colour} square fills the whole frame"]


def make_imagefolder_layout(root: Path, metadata: str = "jsonl", splits: bool = False,
                            per_colour: int = 3) -> Path:
    """The same colour squares in Hugging Face's imagefolder layout: metadata.jsonl (one row per image with
    its captions as a list, or one row per caption) or metadata.csv (file_name,text, one row per caption).
    With `splits`, the `*_0.jpg` images go in validation/ and the others in train/, each with its own
    metadata file; without, everything is in one folder (all train)."""
    import csv
    import json

    folders: dict[Path, list[tuple[str, list[str]]]] = {}
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            folder = root / ("validation" if i == 0 else "train") if splits else root
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{colour}_{i}.jpg"
            shade = tuple(max(0, min(255, c + 10 * i)) for c in rgb)
            Image.new("RGB", (64, 48), shade).save(folder / name, quality=95)
            folders.setdefault(folder, []).append((name, _captions(colour)))
    for folder, rows in folders.items():
        if metadata == "jsonl":
            lines = []
            for k, (name, texts) in enumerate(rows):
                if k % 2:  # both spellings: a list of captions, and one row per caption
                    lines.append(json.dumps({"file_name": name, "text": texts}))
                else:
                    lines += [json.dumps({"file_name": name, "text": t}) for t in texts]
            (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        else:
            with open(folder / "metadata.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file_name", "text"])
                w.writerows((name, t) for name, texts in rows for t in texts)
    return root
