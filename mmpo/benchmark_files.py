"""The files of real hallucination benchmarks, read and checked: POPE, COCO instances (CHAIR), MMHal-Bench.

The data stays the user's: nothing is downloaded, an image URL is looked up by its file name in the
image folder. Every reader checks what it reads (keys, labels, image files) and raises ValueError naming
the file and line (or record), so a bad file fails before any answer is generated.

- POPE (Li et al. 2023): JSONL, one ``{"question_id", "image", "text", "label": "yes"|"no"}`` a line, one
  file per split (``coco_pope_random.json``, ``..._popular``, ``..._adversarial``).
- COCO instances (``instances_val2014.json``): ``images`` (id, file_name), ``annotations`` (image_id,
  category_id), ``categories`` (id, name); optionally a captions file (``annotations``: image_id, caption).
- MMHal-Bench (Sun et al. 2023): a JSON list of ``{"image_src" or "image", "question", "gt_answer",
  "question_type", "image_content"}``, scored by a user judge ``judge(record, answer) -> float in [0, 6]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image

from mmpo.coco_synonyms import COCO_SYNONYMS, mentions, phrase_table, read_synonyms

__all__ = [
    "ChairSettings",
    "Judge",
    "MMHalSettings",
    "PopeSettings",
    "load_judge",
    "open_image",
    "read_coco",
    "read_mmhal",
    "read_pope",
    "split_name",
]

Judge = Callable[[dict[str, Any], str], float]


@dataclass
class PopeSettings:
    """POPE question files.

    Args:
        files: JSONL question files; a split is named "random", "popular" or "adversarial" when its file name
            holds one of them, else by the file's stem; ``name=path`` names it.
        image_root: folder of the images (default: each file's folder).
        template: the question as asked; ``{question}`` is the file's ``text`` (LLaVA-1.5 appends
            ``"\\nAnswer the question using a single word or phrase."``).
        answer_rule: ``pope`` (POPE's own reading) or ``first_word``.
        max_questions: the first N questions of each file (None: all).
        max_new_tokens: longest answer.
    """

    files: list[str]
    image_root: str | None = None
    template: str = "{question}"
    answer_rule: str = "pope"
    max_questions: int | None = None
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("pope.files is empty: give the question files")
        if self.answer_rule not in ("pope", "first_word"):
            raise ValueError(f"pope.answer_rule must be 'pope' or 'first_word', got {self.answer_rule!r}")


@dataclass
class ChairSettings:
    """CHAIR on captions of COCO images.

    Args:
        annotations: COCO-style instances file (e.g. ``instances_val2014.json``).
        image_root: folder of its images (``file_name``; default: the file's folder).
        num_images: images captioned, drawn with ``seed`` from the file's images (None: all).
        seed: seed of that draw.
        prompt: the caption request.
        reference_captions: COCO captions file (``annotations``: image_id, caption): objects its captions
            name count as present too, as in CHAIR.
        synonyms: a synonym file (:func:`mmpo.coco_synonyms.read_synonyms`), added to the built-in table.
        replace_synonyms: the synonym file replaces the built-in table.
        max_new_tokens: longest caption.
    """

    annotations: str
    image_root: str | None = None
    num_images: int | None = 500
    seed: int = 0
    prompt: str = "Please describe this image in detail."
    reference_captions: str | None = None
    synonyms: str | None = None
    replace_synonyms: bool = False
    max_new_tokens: int = 128


@dataclass
class MMHalSettings:
    """MMHal-Bench questions.

    Args:
        file: the JSON list of questions.
        image_root: folder of the images; a URL is looked up by its file name here (default: the file's folder).
        judge: ``judge(record, answer) -> float in [0, 6]`` (``record``: the file's record), or where it is
            (``package.module.name``, ``package.module:name`` or ``file.py:name``; a class is instantiated
            without arguments). None: the answers are written, unscored.
        max_questions: the first N questions (None: all).
        max_new_tokens: longest answer.
    """

    file: str
    image_root: str | None = None
    judge: str | Judge | None = None
    max_questions: int | None = None
    max_new_tokens: int = 128


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _image(where: str, name: Any, root: Path) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, f"no image named ({name!r})")
    if name.startswith(("http://", "https://")):
        name = Path(urlparse(name).path).name  # mmpo downloads nothing: the file must already be in the root
    path = root / name
    if not path.is_file():
        raise _fail(where, f"image {path} not found")
    return path


def split_name(spec: str) -> tuple[str, Path]:
    """A POPE split's name and file: ``name=path``, or the split its file name holds, or the file's stem."""
    name, eq, path = spec.partition("=")
    if eq:
        return name, Path(path)
    stem = Path(spec).stem
    found = [s for s in ("random", "popular", "adversarial") if s in stem]
    return (found[0] if len(found) == 1 else stem), Path(spec)


def read_pope(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """A POPE file's questions: ``question_id``, ``image`` (a checked path), ``text``, ``label`` (bool)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(where, f"not a JSON object ({e.msg}); POPE files hold one question per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise _fail(where, "expected an object with question_id, image, text and label")
        label = str(record.get("label", "")).strip().lower()
        if label not in ("yes", "no"):
            raise _fail(where, f"label must be 'yes' or 'no', got {record.get('label')!r}")
        image = _image(where, record.get("image"), root)
        qid = record.get("question_id", number)
        questions.append({"question_id": qid, "image": image, "text": record["text"], "label": label == "yes"})
    if not questions:
        raise _fail(str(path), "no questions")
    return questions


def read_coco(settings: ChairSettings) -> tuple[list[dict[str, Any]], dict]:
    """The images to caption (``image_id``, ``image``: a checked path, ``objects``: their category names) and
    the phrase table over the file's categories (:func:`mmpo.coco_synonyms.phrase_table`)."""
    path = Path(settings.annotations)
    root = Path(settings.image_root) if settings.image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _fail(str(path), f"not valid JSON ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise _fail(str(path), "expected COCO instances: lists 'images', 'annotations' and 'categories'")
    try:
        names = {c["id"]: c["name"].lower() for c in data["categories"]}
        images = {im["id"]: im["file_name"] for im in data["images"]}
        objects: dict[Any, set[str]] = {i: set() for i in images}
        for n, ann in enumerate(data.get("annotations", [])):
            if ann["image_id"] not in objects or ann["category_id"] not in names:
                raise _fail(f"{path}: annotations[{n}]", "unknown image_id or category_id")
            objects[ann["image_id"]].add(names[ann["category_id"]])
    except (KeyError, TypeError, AttributeError) as e:
        raise _fail(str(path), f"a record lacks a COCO field ({e})") from e
    chosen = sorted(images)
    if settings.num_images is not None and settings.num_images < len(chosen):
        chosen = sorted(random.Random(settings.seed).sample(chosen, settings.num_images))
    table = _chair_table(settings, names.values())
    if settings.reference_captions:
        refs = json.loads(Path(settings.reference_captions).read_text(encoding="utf-8"))
        if not isinstance(refs, dict) or not isinstance(refs.get("annotations"), list):
            raise _fail(settings.reference_captions, "expected COCO captions: a list 'annotations'")
        for n, ann in enumerate(refs["annotations"]):
            if not (isinstance(ann, dict) and isinstance(ann.get("caption"), str)):
                raise _fail(f"{settings.reference_captions}: annotations[{n}]", "no caption")
            if ann.get("image_id") in objects:  # captions of images outside the instances file are not needed
                objects[ann["image_id"]].update(mentions(ann["caption"], table))
    records = [
        {"image_id": i, "image": _image(f"{path}: image {i}", images[i], root), "objects": frozenset(objects[i])}
        for i in chosen
    ]
    return records, table


def _chair_table(settings: ChairSettings, classes: Any) -> dict:
    synonyms = None
    if settings.synonyms:
        user = read_synonyms(settings.synonyms)
        both = COCO_SYNONYMS | user
        synonyms = user if settings.replace_synonyms else {k: COCO_SYNONYMS.get(k, ()) + user.get(k, ()) for k in both}
    return phrase_table(synonyms, classes=set(classes))


def read_mmhal(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """MMHal questions: ``index``, ``image`` (a checked path), ``question``, ``question_type`` and the file's
    ``record`` as it is (what the judge is given)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _fail(str(path), f"not valid JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise _fail(str(path), "expected a non-empty JSON list of questions")
    records = []
    for n, record in enumerate(data):
        where = f"{path}: record {n}"
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise _fail(where, "expected an object with a question")
        image = _image(where, record.get("image") or record.get("image_src"), root)
        kind = str(record.get("question_type", "all"))
        records.append(
            {"index": n, "image": image, "question": record["question"], "question_type": kind, "record": record}
        )
    return records


def load_judge(judge: str | Judge) -> Judge:
    """A judge callable, or the one ``judge`` names: ``package.module.name``, ``package.module:name`` or
    ``path/to/file.py:name``; a class is instantiated without arguments."""
    if callable(judge):
        return judge
    module, sep, name = judge.rpartition(":") if ":" in judge else judge.rpartition(".")
    try:
        if module.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module).stem, module)
            if spec is None or not Path(module).is_file():
                raise ImportError(f"no file {module}")
            loaded = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(module) if sep and module else None
        found = getattr(loaded, name, None)
    except ImportError as e:
        raise ValueError(f"judge {judge!r} cannot be imported ({e}); is its folder on PYTHONPATH?") from e
    if not callable(found):
        raise ValueError(f"judge {judge!r} names no callable (give package.module.name or file.py:name)")
    return found() if isinstance(found, type) else found


def open_image(path: Path) -> Image.Image:
    """The image, RGB; an unreadable file raises ValueError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"image {path} cannot be read: {e}") from e
