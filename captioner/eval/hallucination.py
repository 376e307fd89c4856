"""Object hallucination, in the spirit of CHAIR (Rohrbach et al. 2018, "Object hallucination in image
captioning"): does a caption name an object that none of the image's references names?

    counts = object_hallucination({"1.jpg": "a dog sitting at a table"},
                                  {"1.jpg": ["broccoli on a table", "a plate of food on a desk"]})
    counts["chair_i"], counts["chair_s"]      # 0.5 (dog, of dog and table), 1.0 (one caption of one)

- OBJECTS lists the objects this measure knows, each with the words a caption may use for it: plurals,
  synonyms and two-word names folded together (dog/dogs/puppy, bicycle/bike, water/lake/river/ocean/pool,
  "teddy bear" apart from "bear", "hot dog" apart from "dog"). It covers COCO's 80 categories and the
  things Flickr8k's captions name most (people, water, snow, grass, street, beach, mountain, ...).
- A caption mentions an object when one of its words (or word pairs) is one of that object's names; each
  object counts once per caption. A mention is hallucinated when no reference of the image mentions it.
- CHAIR-i = hallucinated mentions / mentions; CHAIR-s = captions with a hallucinated mention / captions.

Words that are as often something else are left out: "orange" (the colour), "light", "glass" (whose
plural is eyeglasses), "waves" (a hand's), "couple" ("a couple of dogs").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# object -> the names a caption may use for it (singular; plurals are added below, irregular ones here).
OBJECTS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid",
               "baby", "toddler", "player", "guy", "lady", "ladies", "gentleman", "gentlemen", "adult",
               "teenager", "teen", "skier", "surfer", "skateboarder", "snowboarder", "biker", "cyclist",
               "rider", "crowd", "team", "family", "worker", "chef", "cook", "policeman",
               "policemen", "officer", "soldier", "athlete", "catcher", "batter", "umpire", "bride", "groom",
               "swimmer", "runner", "climber", "dancer", "tourist", "student", "friend", "someone"),
    "dog": ("dog", "puppy", "puppies", "pup"),
    "cat": ("cat", "kitten", "kitty", "kitties"),
    "horse": ("horse", "pony", "ponies", "foal"),
    "bird": ("bird", "duck", "goose", "geese", "seagull", "gull", "pigeon", "parrot", "eagle", "owl", "swan",
             "chicken", "rooster", "hen", "penguin", "flamingo", "pelican"),
    "sheep": ("sheep", "lamb", "ram"),
    "cow": ("cow", "cattle", "bull", "calf", "calves", "ox", "oxen"),
    "elephant": ("elephant",),
    "bear": ("bear",),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "bicycle": ("bicycle", "bike", "tricycle"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped", "dirt bike", "motor bike"),
    "car": ("car", "taxi", "cab", "suv", "jeep", "sedan", "convertible", "limo", "limousine"),
    "bus": ("bus", "buses"),
    "train": ("train", "locomotive", "tram", "trolley", "subway"),
    "truck": ("truck", "pickup", "lorry", "firetruck"),
    "airplane": ("airplane", "plane", "jet", "aircraft", "airliner"),
    "boat": ("boat", "ship", "canoe", "kayak", "sailboat", "yacht", "raft", "ferry", "ferries"),
    "traffic light": ("traffic light", "stoplight", "stop light"),
    "fire hydrant": ("hydrant", "fire hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "benches"),
    "umbrella": ("umbrella", "parasol"),
    "backpack": ("backpack", "rucksack"),
    "handbag": ("handbag", "purse"),
    "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard",),
    "ball": ("ball", "football", "soccer ball", "basketball", "volleyball", "tennis ball"),
    "kite": ("kite",),
    "baseball bat": ("bat", "baseball bat"),
    "baseball glove": ("glove", "mitt", "baseball glove"),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard",),
    "tennis racket": ("racket", "racquet", "tennis racket"),
    "bottle": ("bottle",),
    "cup": ("cup", "mug", "wine glass"),
    "fork": ("fork",),
    "knife": ("knife", "knives"),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "sandwiches", "burger", "hamburger"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake"),
    "chair": ("chair", "stool"),
    "couch": ("couch", "couches", "sofa"),
    "plant": ("plant", "houseplant"),
    "flower": ("flower", "bouquet"),
    "bed": ("bed",),
    "table": ("table", "desk", "dining table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television"),
    "computer": ("computer", "laptop", "monitor", "desktop"),
    "mouse": ("mouse", "mice"),
    "remote": ("remote",),
    "keyboard": ("keyboard",),
    "phone": ("phone", "cellphone", "smartphone", "cell phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy"),
    "toothbrush": ("toothbrush", "toothbrushes"),
    # Flickr8k's world: what its captions name most besides people and dogs.
    "water": ("water", "lake", "river", "ocean", "sea", "pool", "pond", "stream", "creek"),
    "snow": ("snow",),
    "grass": ("grass", "lawn"),
    "beach": ("beach", "beaches", "sand", "shore"),
    "mountain": ("mountain", "hill", "hillside", "cliff"),
    "street": ("street", "road", "sidewalk"),
    "tree": ("tree", "forest", "woods"),
    "building": ("building",),
    "fence": ("fence",),
    "kitchen": ("kitchen",),
}

_WORD = re.compile(r"[a-z]+")


def _plurals(name: str) -> set[str]:
    """A singular name and its regular plural forms (for a two-word name, of its last word)."""
    head, _, last = name.rpartition(" ")
    prefix = f"{head} " if head else ""
    forms = {name, f"{prefix}{last}s"}
    if last.endswith(("s", "sh", "ch", "x", "o")):
        forms.add(f"{prefix}{last}es")
    if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        forms.add(f"{prefix}{last[:-1]}ies")
    return forms


def _name_table(objects: Mapping[str, Sequence[str]]) -> dict[str, str]:
    table: dict[str, str] = {}
    for obj, names in objects.items():
        for name in names:
            for form in _plurals(name):
                if table.setdefault(form, obj) != obj:
                    raise ValueError(f"'{form}' names both {table[form]} and {obj}")
    return table


NAMES = _name_table(OBJECTS)  # every surface form (one word or two) -> its object


def mentions(caption: str, names: Mapping[str, str] = NAMES) -> set[str]:
    """The objects a caption names. A two-word name takes its words, so "teddy bear" is no "bear" and
    "hot dog" no "dog"."""
    words = _WORD.findall(caption.lower())
    found: set[str] = set()
    i = 0
    while i < len(words):
        if i + 1 < len(words) and f"{words[i]} {words[i + 1]}" in names:
            found.add(names[f"{words[i]} {words[i + 1]}"])
            i += 2
            continue
        if words[i] in names:
            found.add(names[words[i]])
        i += 1
    return found


def hallucinated(caption: str, references: Iterable[str]) -> set[str]:
    """The objects the caption names that no reference names."""
    named = set().union(*(mentions(r) for r in references))
    return mentions(caption) - named


def object_hallucination(captions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """CHAIR-i and CHAIR-s over the images of `captions` (keys also in `references`), with the counts
    behind them and, for each object, how often a caption named it and how often wrongly."""
    n_mentions = n_wrong = n_bad_captions = 0
    said: Counter[str] = Counter()
    wrong: Counter[str] = Counter()
    per_image: dict[str, list[str]] = {}
    for key, caption in captions.items():
        named = mentions(caption)
        bad = hallucinated(caption, references[key])
        said.update(named)
        wrong.update(bad)
        n_mentions += len(named)
        n_wrong += len(bad)
        n_bad_captions += bool(bad)
        per_image[key] = sorted(bad)
    return {
        "chair_i": n_wrong / n_mentions if n_mentions else 0.0,
        "chair_s": n_bad_captions / len(captions) if captions else 0.0,
        "mentions": n_mentions, "hallucinated": n_wrong, "captions": len(captions),
        "captions_hallucinating": n_bad_captions,
        "objects": {obj: {"said": said[obj], "wrong": wrong[obj]} for obj in sorted(said)},
        "per_image": per_image,
    }


def format_hallucination(counts: Mapping, most: int = 5) -> str:
    """Two lines for the evaluate report: CHAIR-i and CHAIR-s with their counts, and the objects most
    often named wrongly ("dog 34 of 36")."""
    line = (f"objects named that no reference names (CHAIR): CHAIR-i {100 * counts['chair_i']:.1f}% "
            f"({counts['hallucinated']} of {counts['mentions']} mentions), CHAIR-s "
            f"{100 * counts['chair_s']:.1f}% ({counts['captions_hallucinating']} of {counts['captions']} captions)")
    worst = sorted(((v["wrong"], v["said"], k) for k, v in counts["objects"].items() if v["wrong"]),
                   key=lambda t: (-t[0], t[2]))[:most]
    if worst:
        line += "\n  most often wrong: " + ", ".join(f"{k} {w} of {s}" for w, s, k in worst)
    return line
