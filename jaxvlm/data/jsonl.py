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

Hostile records are data errors, never crashes (docs/data.md; tests/test_fuzz_data.py feeds generated bad records
through here):

* JSON: a line over MAX_RECORD_BYTES (kind "too_long"), invalid UTF-8, invalid JSON, NaN / Infinity literals and
  numbers beyond a float (``1e999``), a key given twice in one object, nesting deeper than MAX_JSON_DEPTH, an
  integer over Python's 4,300-digit limit (kind "parse"). The errors of a file that is gzip-compressed, UTF-16 or has
  CR-only line ends say so. A UTF-8 byte-order mark before the first record is allowed.
* Fields: every field is type-checked before use (`jaxvlm.data.example.validate_example`); text must be valid
  UTF-8 (a lone surrogate is an error naming the field); values quoted in messages are shortened.
* Images: only IMAGE_FORMATS are opened (never EPS or PDF, whose PIL plugins run Ghostscript); an image over
  ``max_image_pixels`` (``data.max_image_pixels``) or with a zero side is rejected from its header, before it is
  decoded; a truncated or corrupt file, or a mode with no faithful RGB conversion (32-bit float "F"), is kind
  "bad_image". 16-bit greyscale is scaled to 8 bits (`jaxvlm.processing.image.pil_to_rgb`). PIL's global
  ``Image.MAX_IMAGE_PIXELS`` is left alone: ``max_image_pixels`` may not exceed its hard limit (twice that value).
* Special tokens of the tokenizer typed in the text are rejected by the encoder (`jaxvlm.data.pipeline`).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from jaxvlm.data.example import ANSWER_TYPES, FIELDS, ExampleError, brief_repr, brief_text, validate_example
from jaxvlm.processing.image import pil_to_rgb

RECORD_FORMATS = ("jaxvlm", "r1v")
_ALIASES = {"image": "images", "hint": "reasoning"}
_IGNORED_R1V_KEYS = ("conversations", "accu_reward_method", "messages")

MAX_RECORD_BYTES = 8 << 20  # one JSONL line; images are files, so a record is text only
MAX_JSON_DEPTH = 16  # nested arrays / objects in one record (a record needs 3: object, list, list of objects)
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 = 8192 x 8192; below PIL's 89,478,485 warning threshold
# The raster formats an image file may have (PIL's plugin names; JPEG covers MPO). Never EPS / PDF: PIL runs
# Ghostscript on them. A format this PIL build lacks (AVIF, JPEG2000) is left out rather than failing `Image.open`.
Image.init()
_RASTER_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "JPEG2000", "AVIF")
IMAGE_FORMATS = tuple(f for f in _RASTER_FORMATS if f in Image.OPEN)
_SCAN_BLOCK = 1 << 20  # bytes read at a time when indexing a file (a huge line is never read whole)
_FILE_KINDS = (  # (leading bytes, what the file is), for the hint on parse errors
    (b"\x1f\x8b", "gzip-compressed: decompress it first"),
    (b"BZh", "bzip2-compressed: decompress it first"),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first"),
    (b"\xff\xfe", "UTF-16 (it starts with a UTF-16 byte-order mark): jaxvlm reads UTF-8"),
    (b"\xfe\xff", "UTF-16 (it starts with a UTF-16 byte-order mark): jaxvlm reads UTF-8"),
)


class DataError(ExampleError):
    """A record that cannot be used; the message starts with ``file:line`` and names the field.

    `kind` classifies it for the skip counters: "parse", "field", "missing_image", "bad_image", "too_long".
    """

    def __init__(self, message: str, kind: str = "field"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` when a grain worker process sends the error back
        return type(self), (str(self), self.kind)


def _strip_tags(solution: str) -> str:
    """The answer inside R1-V's ``<answer>...</answer>`` (after dropping a ``<think>`` block), else the text."""
    text = re.sub(r"<think>.*?</think>", "", solution, flags=re.DOTALL)
    match = re.search(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return (match.group(1) if match else text).strip()


# ----------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity literals are rejected)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {brief_repr(text)} is beyond the range of a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise ValueError(f"key {brief_repr(key)} appears twice in one object")
        record[key] = value
    return record


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_record(text: str, where: str, hint: str = "") -> dict[str, Any]:
    """The JSON object on one line; DataError (kind "parse") for anything else, `hint` appended to the message.

    Stricter than `json.loads`: NaN / Infinity literals, numbers beyond a float, duplicate keys and nesting deeper
    than MAX_JSON_DEPTH are errors too.
    """
    try:
        record = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise DataError(f"{where}: not valid JSON: nested too deeply to parse{hint}", kind="parse") from None
    except ValueError as error:  # JSONDecodeError, the hooks above, an integer over 4300 digits
        raise DataError(f"{where}: not valid JSON: {brief_text(str(error))}{hint}", kind="parse") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}{hint}", kind="parse")
    depth = json_depth(record)
    if depth > MAX_JSON_DEPTH:
        raise DataError(f"{where}: the record nests {depth} levels deep (at most {MAX_JSON_DEPTH})", kind="parse")
    return record


def _file_hint(head: bytes, has_newline: bool) -> str:
    """What is wrong with a whole file, from its first bytes (to append to parse errors), or ""."""
    for magic, what in _FILE_KINDS:
        if head.startswith(magic):
            return f" (the file is {what})"
    if b"\x00" in head:
        return " (the file has NUL bytes: it looks UTF-16 or binary; jaxvlm reads UTF-8 JSON lines)"
    if b"\r" in head and not has_newline:
        return " (the file has CR-only line ends, so it reads as one line: use \\n line ends)"
    return ""


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def pil_pixel_limit() -> int | None:
    """The largest image PIL opens at all (twice ``Image.MAX_IMAGE_PIXELS``; None when that check is off)."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def load_image(path: str, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from an image file; DataError (missing_image / bad_image) otherwise.

    The size is checked against `max_pixels` from the file's header, before any pixel is decoded.
    """
    shown = brief_repr(path, 200)
    if not os.path.isfile(path):
        raise DataError(f"{where}: field 'images': image file not found: {shown}", kind="missing_image")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise DataError(f"{where}: field 'images': image {shown} has size {width}x{height}", kind="bad_image")
            if width * height > max_pixels:
                raise DataError(
                    f"{where}: field 'images': image {shown} is {width}x{height} = {width * height} pixels > "
                    f"data.max_image_pixels={max_pixels}",
                    kind="bad_image",
                )
            image.load()
            return pil_to_rgb(image)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(
            f"{where}: field 'images': image {shown} is over PIL's size limit, and so over "
            f"data.max_image_pixels={max_pixels}: {error}",
            kind="bad_image",
        ) from None
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        formats = "" if not isinstance(error, Image.UnidentifiedImageError) else f" (formats read: {IMAGE_FORMATS})"
        raise DataError(
            f"{where}: field 'images': cannot decode image {shown}: {type(error).__name__}: "
            f"{brief_text(str(error))}{formats}",
            kind="bad_image",
        ) from None


class JsonlSource:
    """A grain random-access source over one JSONL file: ``source[i]`` is the validated example of line i.

    Args:
      path: the .jsonl file.
      record_format: "jaxvlm" or "r1v" (see the module docstring).
      answer_type: the answer type of records that do not say (one of ANSWER_TYPES).
      image_root: directory image paths are relative to (default: the file's directory).
      max_image_pixels: the most pixels (width x height) an image may have (``data.max_image_pixels``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        record_format: str = "jaxvlm",
        answer_type: str = "string",
        image_root: str | os.PathLike | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.path = os.fspath(path)
        if record_format not in RECORD_FORMATS:
            raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
        check_max_image_pixels(max_image_pixels)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"JSONL dataset not found: {self.path}")
        self.record_format = record_format
        self.answer_type = answer_type
        self.image_root = os.fspath(image_root) if image_root else os.path.dirname(os.path.abspath(self.path))
        self.max_image_pixels = int(max_image_pixels)
        offsets, line_numbers, has_newline = _index_lines(self.path)
        self._offsets = np.asarray(offsets, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        with open(self.path, "rb") as f:
            self._hint = _file_hint(f.read(4096), has_newline)

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, records={len(self)}, record_format={self.record_format!r})"

    def line_number(self, index: int) -> int:
        return int(self._line_numbers[index])

    def _read_line(self, index: int) -> bytes:
        """Line `index`'s bytes, at most MAX_RECORD_BYTES + 1 of them (so a longer line shows as too long)."""
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            return f.readline(MAX_RECORD_BYTES + 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path} has {len(self)} records, index {index}")
        where = f"{self.path}:{self.line_number(index)}"
        try:
            return self._example(index, where)
        except DataError:
            raise
        except ExampleError as error:
            raise DataError(str(error), kind="field") from None
        except Exception as error:  # a safety net: every check above should have caught it first
            raise DataError(
                f"{where}: unexpected {type(error).__name__} reading the record: {brief_text(str(error))}",
                kind="field",
            ) from error

    def _example(self, index: int, where: str) -> dict[str, Any]:
        raw = self._read_line(index)
        if len(raw) > MAX_RECORD_BYTES:
            raise DataError(f"{where}: the record is over {MAX_RECORD_BYTES} bytes{self._hint}", kind="too_long")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not UTF-8 text: {error}{self._hint}", kind="parse") from None
        if self._offsets[index] == 0:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
        record = parse_record(text, where, self._hint)
        return validate_example(self._to_example(record, where))

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
                problem_type = record.pop("problem_type")
                if not isinstance(problem_type, (str, int)) or isinstance(problem_type, bool):
                    raise DataError(f"{where}: field 'problem_type': must be a string, got {brief_repr(problem_type)}")
                record["task"] = str(problem_type)
        example: dict[str, Any] = {}
        for key, value in record.items():
            field = _ALIASES.get(key, key)
            if field in example:
                raise DataError(f"{where}: field {field!r} given twice (as {brief_repr(key)} too)")
            if field not in FIELDS or field == "source":
                raise DataError(
                    f"{where}: field {brief_repr(key)}: unknown (known: {', '.join(FIELDS[:-1])}, image, hint)"
                )
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
            raise DataError(f"{where}: field 'images': must be a path or a list of paths, got {brief_repr(value)}")
        resolved = [p if os.path.isabs(p) else os.path.join(self.image_root, p) for p in paths]
        return [load_image(p, where, self.max_image_pixels) for p in resolved]


def max_image_pixels_problem(value: Any) -> str | None:
    """None when `value` is a usable ``max_image_pixels``, else what it must be (a `jaxvlm.checks` rule): an int
    >= 1 that PIL can open (at most `pil_pixel_limit()`)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        return f"must be an integer >= 1, got {value!r}"
    limit = pil_pixel_limit()
    if limit is not None and value > limit:
        return (
            f"must be <= {limit}, PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS), over which PIL "
            f"refuses to open an image; got {value}"
        )
    return None


def check_max_image_pixels(value: Any) -> None:
    """ValueError naming ``max_image_pixels`` unless `max_image_pixels_problem` accepts `value`."""
    problem = max_image_pixels_problem(value)
    if problem is not None:
        raise ValueError(f"max_image_pixels: {problem}")


def _index_lines(path: str) -> tuple[list[int], list[int], bool]:
    """(byte offset, 1-based line number) of every non-blank line, and whether the file has a newline at all.

    Reads at most _SCAN_BLOCK bytes at a time, so a file that is one huge line is never held in memory.
    """
    offsets, line_numbers = [], []
    offset, start, number, nonblank, has_newline = 0, 0, 1, False, False
    with open(path, "rb") as f:
        while piece := f.readline(_SCAN_BLOCK):
            nonblank = nonblank or bool(piece.strip())
            offset += len(piece)
            if piece.endswith(b"\n"):
                has_newline = True
                if nonblank:  # blank lines are not records
                    offsets.append(start)
                    line_numbers.append(number)
                start, number, nonblank = offset, number + 1, False
    if nonblank:
        offsets.append(start)
        line_numbers.append(number)
    return offsets, line_numbers, has_newline
