"""Real datasets: JSON Lines files with images on disk, read as a grain random-access source.

One JSON object per line. The jaxvlm record format (``record_format="jaxvlm"``)::

    {"images": ["imgs/0001.png"], "question": "How many apples?", "answer": "3", "answer_type": "number",
     "reasoning": "...", "caption": "...", "task": "count", "difficulty": 1, "bbox": [x1, y1, x2, y2],
     "options": [...], "id": "..."}

``image`` (one path) is accepted for ``images``, and ``hint`` (DyME's name) for ``reasoning``. Image paths are
relative to the JSONL file's directory (or to ``image_root``). Only ``question`` and ``answer`` are required;
``answer_type`` defaults to the reader's ``answer_type`` argument.

Other projects' records map onto it as follows (``record_format`` does the renaming):

* ``"r1v"`` — R1-V, VLM-R1 and Curr-ReFT: ``{"image": ..., "problem": ..., "solution": "<answer>3</answer>"}``.
  ``problem`` becomes the question; the ``<answer>`` tags (and any ``<think>`` block) are stripped from
  ``solution`` to give the answer. Curr-ReFT keeps one file per stage and answer kind, so pass the file's
  ``answer_type`` (``yesno`` for stage-1 judge files, ``choice``/``multi_choice`` for stage 2, ``math``,
  ``bbox`` or ``labels`` for stage-3 math, detection and classification); a ``"problem_type"`` field, when
  present, sets ``task``. VLM-R1 REC records whose ``solution`` is a box give ``answer_type="bbox"``.
* DyME (``{"image", "question", "answer", "hint"}``) reads as ``"jaxvlm"`` directly.

Reading is lazy: opening a file records each line's byte offset, and ``__getitem__`` parses the line, loads its
images and validates it. A bad record raises `DataError` naming ``file:line`` and the field; the pipeline turns
that into a skipped-and-counted record when ``data.on_error="skip"``. Nothing is ever replaced by another sample.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxvlm.data.example import ANSWER_TYPES, FIELDS, ExampleError, validate_example

RECORD_FORMATS = ("jaxvlm", "r1v")
_ALIASES = {"image": "images", "hint": "reasoning"}
_IGNORED_R1V_KEYS = ("conversations", "accu_reward_method", "messages")


class DataError(ExampleError):
    """A record that cannot be used; the message starts with ``file:line`` and names the field.

    `kind` classifies it for the skip counters: "parse", "field", "missing_image", "bad_image", "too_long".
    """

    def __init__(self, message: str, kind: str = "field"):
        super().__init__(message)
        self.kind = kind


def _strip_tags(solution: str) -> str:
    """The answer inside R1-V's ``<answer>...</answer>`` (after dropping a ``<think>`` block), else the text."""
    text = re.sub(r"<think>.*?</think>", "", solution, flags=re.DOTALL)
    match = re.search(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return (match.group(1) if match else text).strip()


def load_image(path: str, where: str) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from an image file; DataError (missing_image / bad_image) otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: field 'images': image file not found: {path}", kind="missing_image")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P") and ("A" in image.mode or "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{where}: field 'images': cannot decode image {path}: {error}", kind="bad_image") from None


class JsonlSource:
    """A grain random-access source over one JSONL file: ``source[i]`` is the validated example of line i.

    Args:
      path: the .jsonl file.
      record_format: "jaxvlm" or "r1v" (see the module docstring).
      answer_type: the answer type of records that do not say (one of ANSWER_TYPES).
      image_root: directory image paths are relative to (default: the file's directory).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        record_format: str = "jaxvlm",
        answer_type: str = "string",
        image_root: str | os.PathLike | None = None,
    ):
        self.path = os.fspath(path)
        if record_format not in RECORD_FORMATS:
            raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"JSONL dataset not found: {self.path}")
        self.record_format = record_format
        self.answer_type = answer_type
        self.image_root = os.fspath(image_root) if image_root else os.path.dirname(os.path.abspath(self.path))
        offsets, line_numbers = [], []
        with open(self.path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():  # blank lines are not records
                    offsets.append(offset)
                    line_numbers.append(number)
                offset += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, records={len(self)}, record_format={self.record_format!r})"

    def line_number(self, index: int) -> int:
        return int(self._line_numbers[index])

    def _read_line(self, index: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            return f.readline().decode("utf-8", errors="strict")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path} has {len(self)} records, index {index}")
        where = f"{self.path}:{self.line_number(index)}"
        try:
            record = json.loads(self._read_line(index))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{where}: not valid JSON: {error}", kind="parse") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}", kind="parse")
        example = self._to_example(record, where)
        try:
            return validate_example(example)
        except DataError:
            raise
        except ExampleError as error:
            raise DataError(str(error), kind="field") from None

    def _to_example(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        record = dict(record)
        if self.record_format == "r1v":
            for key in _IGNORED_R1V_KEYS:
                record.pop(key, None)
            if "problem" in record:
                record["question"] = record.pop("problem")
            if "solution" in record:
                solution = record.pop("solution")
                record["answer"] = _strip_tags(solution) if isinstance(solution, str) else solution
            if "problem_type" in record:
                record["task"] = str(record.pop("problem_type"))
        example: dict[str, Any] = {}
        for key, value in record.items():
            field = _ALIASES.get(key, key)
            if field in example:
                raise DataError(f"{where}: field {field!r} given twice (as {key!r} too)")
            if field not in FIELDS or field == "source":
                raise DataError(f"{where}: field {key!r}: unknown (known: {', '.join(FIELDS[:-1])}, image, hint)")
            example[field] = value
        example.setdefault("answer_type", self.answer_type)
        example.setdefault("id", where)
        example["source"] = where
        example["images"] = self._images(example.get("images"), where)
        return example

    def _images(self, value: Any, where: str) -> list:
        if value is None:
            return []
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise DataError(f"{where}: field 'images': must be a path or a list of paths, got {value!r}")
        resolved = [p if os.path.isabs(p) else os.path.join(self.image_root, p) for p in paths]
        return [load_image(p, where) for p in resolved]
