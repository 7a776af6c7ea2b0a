"""Words and phrases that name the 80 COCO object classes, and the objects a caption names (CHAIR).

CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning") counts the COCO objects a
caption names through a synonym table: "man", "people", "skier" → person; two-word phrases such as
"hot dog" or "traffic light" are read as one object (so "hot dog" is no dog); plurals name their class.
The table below is written for mmpo from COCO's class names and common English synonyms; a user table
(:func:`read_synonyms`) adds to it or replaces it.

A caption is lower-cased and split into alphanumeric words (so "hot-dog" reads as "hot dog"); at each
word the longest phrase of the table that starts there is taken and the scan goes on after it; "orange"
right before an object phrase is read as a colour. A phrase may name no object (``None``): it only
stops its words from being read alone ("baseball field" names no ball, "bus stop" no bus).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "COCO_CLASSES",
    "COCO_SYNONYMS",
    "NON_OBJECT_PHRASES",
    "mentions",
    "phrase_table",
    "plural",
    "read_synonyms",
]

# class → synonyms (singular; plurals are added by `plural`). The class name is a synonym of itself.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady", "gentleman",
        "adult", "teenager", "teen", "player", "skier", "snowboarder", "skateboarder", "surfer", "rider", "biker",
        "cyclist", "bicyclist", "pedestrian", "athlete", "batter", "catcher", "pitcher", "umpire", "chef",
        "officer", "policeman", "soldier", "worker", "tourist", "passenger", "spectator", "audience", "crowd",
    ),
    "bicycle": ("bike", "cycle", "bicycle"),
    "car": ("automobile", "sedan", "taxi", "cab", "suv", "van", "jeep"),
    "motorcycle": ("motorbike", "motor bike", "scooter", "moped", "motor cycle"),
    "airplane": ("plane", "aeroplane", "airliner", "jet", "aircraft", "jetliner"),
    "bus": ("double decker", "school bus"),
    "train": ("locomotive", "tram", "subway", "railcar", "freight train", "passenger train"),
    "truck": ("pickup", "pickup truck", "lorry", "semi truck", "fire truck", "dump truck"),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht", "ferry", "raft", "rowboat", "speedboat", "vessel"),
    "traffic light": ("traffic signal", "stop light", "stoplight", "street light"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": ("meter",),
    "bench": ("park bench",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "parrot", "sparrow", "swan", "eagle", "hawk", "owl"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy"),
    "horse": ("pony", "foal", "stallion", "mare"),
    "sheep": ("lamb", "ram", "ewe"),
    "cow": ("cattle", "bull", "calf", "ox", "oxen"),
    "elephant": (),
    "bear": ("grizzly", "polar bear", "brown bear", "black bear"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("back pack", "rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("purse", "hand bag", "bag", "tote"),
    "tie": ("necktie", "bow tie", "bowtie"),
    "suitcase": ("luggage", "suit case", "briefcase"),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "snowboard": ("snow board",),
    "sports ball": ("ball", "soccer ball", "football", "basketball", "tennis ball", "volleyball", "baseball ball"),
    "kite": (),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt", "baseball mitt"),
    "skateboard": ("skate board",),
    "surfboard": ("surf board",),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "bottle": (),
    "wine glass": (),
    "cup": ("mug", "teacup", "coffee cup"),
    "fork": (),
    "knife": (),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "hamburger", "panini"),
    "orange": ("tangerine", "clementine"),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut",),
    "cake": ("cupcake", "cheesecake"),
    "chair": ("armchair", "stool", "highchair", "high chair"),
    "couch": ("sofa", "loveseat", "love seat"),
    "potted plant": ("houseplant", "house plant", "plant", "flowerpot", "flower pot", "pot plant"),
    "bed": (),
    "dining table": ("table", "desk", "dinner table", "kitchen table"),
    "toilet": ("urinal", "commode"),
    "tv": ("television", "tv set", "monitor"),
    "laptop": ("notebook computer", "computer", "macbook"),
    "mouse": ("computer mouse",),
    "remote": ("remote control", "controller"),
    "keyboard": (),
    "cell phone": ("phone", "cellphone", "mobile phone", "smartphone", "smart phone", "iphone"),
    "microwave": ("microwave oven",),
    "oven": ("stove",),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": ("novel",),
    "clock": ("alarm clock",),
    "vase": (),
    "scissors": ("scissor",),
    "teddy bear": ("teddybear", "stuffed animal", "stuffed bear", "teddy"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer", "blowdryer"),
    "toothbrush": ("tooth brush",),
}  # fmt: skip

COCO_CLASSES: tuple[str, ...] = tuple(COCO_SYNONYMS)

# phrases that contain an object word but name no object
NON_OBJECT_PHRASES: tuple[str, ...] = (
    "baseball field", "baseball game", "baseball diamond", "baseball cap", "baseball uniform", "tennis court",
    "tennis match", "tennis game", "tennis outfit", "soccer field", "football field", "basketball court",
    "toilet paper", "table cloth", "tablecloth", "bus stop", "bus station", "train station",
    "train track", "train tracks", "train platform", "bike lane", "bike path", "car park", "ski slope",
    "ski lift", "ski pole", "ski poles", "ski resort", "dog bed", "cat food", "dog food", "orange juice",
    "apple juice", "cell tower", "traffic cone", "stop light pole", "hot sauce", "phone booth", "book shelf",
    "bookshelf", "bookcase", "clock tower", "sink faucet", "oven mitt", "cake pan", "pizza box", "pizza cutter",
    "donut shop", "sandwich shop", "bed sheet", "bed sheets", "bear claw", "bird cage", "birdcage",
    "bird feeder",
)  # fmt: skip
# phrases read as another class than their last word: a part names its object ("baby elephant": see phrase_table)
_REDIRECTS = {"toilet seat": "toilet", "cup cake": "cake"}
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
_IRREGULAR = {
    "man": "men", "woman": "women", "child": "children", "person": "persons", "knife": "knives",
    "mouse": "mice", "sheep": "sheep", "ox": "oxen", "oxen": "oxen", "people": "people", "cattle": "cattle",
    "skis": "skis", "scissors": "scissors", "calf": "calves", "audience": "audiences", "luggage": "luggage",
    "broccoli": "broccoli", "policeman": "policemen", "gentleman": "gentlemen", "goose": "geese", "shelf": "shelves",
}  # fmt: skip
# a class name that is also a colour: "an orange cat" names a cat, not an orange (the next word starts a phrase)
_COLOURS = ("orange",)
_WORD = re.compile(r"[a-z0-9]+")


def plural(phrase: str) -> str:
    """English plural of a phrase's last word ("traffic light" → "traffic lights", "bus" → "buses")."""
    *head, last = phrase.split()
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def phrase_table(synonyms: Mapping[str, Iterable[str]] | None = None, classes: Iterable[str] | None = None) -> dict:
    """Phrase (tuple of words) → class name, or None for a phrase that names no object.

    Args:
        synonyms: class → synonyms (default: :data:`COCO_SYNONYMS`); each class names itself, plurals are added.
        classes: keep only these classes (e.g. the categories of an annotation file); phrases of the
            others name nothing, since their presence cannot be checked.
    """
    synonyms = COCO_SYNONYMS if synonyms is None else synonyms
    keep = set(synonyms if classes is None else classes)
    table: dict[tuple[str, ...], str | None] = {}
    for phrase in NON_OBJECT_PHRASES:
        table[tuple(_words(phrase))] = None
    for cls, words in synonyms.items():
        for phrase in (cls, *words):
            for form in {phrase, plural(phrase)}:
                table[tuple(_words(form))] = cls if cls in keep else None
        if cls in _ANIMALS:
            for young in ("baby", "young", "mother"):
                table[(young, *_words(cls))] = table[(young, *_words(plural(cls)))] = cls if cls in keep else None
    for phrase, cls in _REDIRECTS.items():
        table[tuple(_words(phrase))] = cls if cls in keep else None
    for cls in keep - set(synonyms):  # a class with no entry in the table still names itself
        table[tuple(_words(cls))] = table[tuple(_words(plural(cls)))] = cls
    return table


def mentions(caption: str, table: Mapping[tuple[str, ...], str | None]) -> list[str]:
    """The classes a caption names, one entry per mention, in order (longest phrase first at each word)."""
    words, found, i = _words(caption), [], 0
    longest = max((len(p) for p in table), default=1)

    def match(at: int) -> int:  # words in the longest phrase at ``at`` (0: none)
        return next((n for n in range(min(longest, len(words) - at), 0, -1) if tuple(words[at : at + n]) in table), 0)

    while i < len(words):
        n = match(i)
        if n and not (words[i] in _COLOURS and i + 1 < len(words) and match(i + 1)):
            phrase = table[tuple(words[i : i + n])]
            found += [phrase] if phrase is not None else []
            i += n
        else:
            i += 1
    return found


def read_synonyms(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A user synonym table: JSON ``{"class": ["synonym", ...]}``, or text lines ``class, synonym, synonym``
    (the first name of a line is the class; ``#`` starts a comment). Raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synonym file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(w, str) for w in v) for v in data.values()
        ):
            raise ValueError(f'{path}: expected {{"class": ["synonym", ...]}}')
        return {k.strip().lower(): tuple(w.strip().lower() for w in v) for k, v in data.items()}
    table: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        names = [n.strip().lower() for n in line.split("#", 1)[0].split(",")]
        if names == [""]:
            continue
        if any(not _words(n) for n in names):
            raise ValueError(f"{path}:{number}: an empty name in {line.strip()!r} (expected: class, synonym, ...)")
        table[names[0]] = table.get(names[0], ()) + tuple(names[1:])
    return table
