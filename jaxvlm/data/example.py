"""The one record format every jaxvlm dataset produces: a plain dict called an *example*.

The gym (`jaxvlm.data.gym`), its tensorflow-datasets builder and the JSONL reader (`jaxvlm.data.jsonl`) all yield
examples; the pipeline (`jaxvlm.data.pipeline`) turns them into model batches, and the reward library
(`jaxvlm.rewards`) scores completions against them. Fields:

  id           str, unique within a dataset ("gym/train/count/17", "data.jsonl:12").
  question     str, the bare question (no format instructions: the prompt style adds those).
  answer       str, the reference answer, canonical for its `answer_type` (see ANSWER_TYPES).
  answer_type  str, how the answer is scored: one of ANSWER_TYPES.
  task         str, the task family ("exists", "count", "grounding", ...; free-form for JSONL data).
  images       list of uint8 arrays [H, W, 3] (RGB); empty for text-only examples.
  reasoning    str, a reference chain of thought ("" if none): SFT targets, DyME's memorisation rows.
  caption      str, a description of the image(s) ("" if none): Infi-MMR's caption-augmented phase.
  difficulty   int, a graded level >= 0 (0 when unknown).
  bbox         list of 4 floats [x1, y1, x2, y2] in pixels of the (first) image, or [] (grounding answers).
  options      list of str, the option texts of choice questions, in letter order A, B, ... (else []).
  target       str, a verbatim reference completion ("" if none); when set it is the SFT target instead of the
               prompt style's reasoning + answer (rejection-sampling SFT trains on the model's own best samples).
  source       str, where the example came from ("gym" or "path/to/file.jsonl:LINE"), for error messages.

Text that reaches the model or the rewards (question, answer, reasoning, caption, target, task and each option) must
be valid Unicode text that encodes to UTF-8: a lone surrogate ("\\ud800" in JSON) is an error naming the field.
Numbers must be finite (NaN and infinities are errors, never the answers "nan" / "inf"); a box is 4 finite numbers
(booleans are not numbers). Values quoted in error messages are shortened (`brief_repr`), so a huge field cannot
flood a log.

Canonical answers by `answer_type`:
  yesno         "yes" | "no"
  choice        one option letter, "B"
  multi_choice  sorted distinct letters joined by ",", "A,C"
  number        a decimal number, "3", "-2.5"
  math          a math expression (scored with math-verify), "\\frac{1}{2}"
  string        free text, compared after normalisation, "red"
  bbox          "[x1, y1, x2, y2]" (the `bbox` field holds the same four numbers)
  labels        one or more labels joined by ", ", "calm" or "calm, warm" (scored by Jaccard overlap)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

ANSWER_TYPES = ("yesno", "choice", "multi_choice", "number", "math", "string", "bbox", "labels")

REQUIRED_FIELDS = ("question", "answer")
DEFAULTS: dict[str, Any] = {
    "id": "",
    "answer_type": "string",
    "task": "",
    "reasoning": "",
    "caption": "",
    "difficulty": 0,
    "bbox": [],
    "options": [],
    "target": "",
    "source": "",
}
FIELDS = (
    "id",
    "question",
    "answer",
    "answer_type",
    "task",
    "images",
    "reasoning",
    "caption",
    "difficulty",
    "bbox",
    "options",
    "target",
    "source",
)

OPTION_LETTERS = "ABCDEFGHIJ"
# Fields whose text is tokenized or scored: valid UTF-8 text (no lone surrogates), see `check_text`.
TEXT_FIELDS = ("question", "answer", "reasoning", "caption", "target", "task")
REPR_LIMIT = 80  # characters of a value quoted in an error message
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class ExampleError(ValueError):
    """A malformed example; the message names where it came from (`source`) and the offending field."""


def example_location(example: Mapping[str, Any]) -> str:
    """Where an example came from, for error messages: "file.jsonl:12", or "gym [gym/train/count/3]"."""
    source, ident = str(example.get("source") or ""), str(example.get("id") or "")
    if source and ident and ident != source:
        return f"{source} [{ident}]"
    return source or ident or "<example>"


def _fail(where: str, field: str, message: str) -> ExampleError:
    return ExampleError(f"{where or '<example>'}: field {field!r}: {message}")


def brief_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """`repr(value)` cut to `limit` characters (saying how long it was), for error messages."""
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > limit:
        return f"{repr(value[:limit])[:limit]}... ({type(value).__name__} of length {len(value)})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def brief_text(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (saying how long it was), for messages that quote other messages."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_number(value: Any) -> bool:
    """A real number that is not a bool (JSON's true/false are not numbers here)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_text(where: str, field: str, text: str) -> str:
    """`text` unchanged if it encodes to UTF-8; ExampleError naming the field and position of a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _fail(
            where, field, f"contains a lone surrogate {text[error.start]!r} at character {error.start}: not valid text"
        ) from None
    return text


def canonical_answer(answer_type: str, answer: str, where: str = "") -> str:
    """`answer` rewritten in the canonical form of `answer_type`; raises ExampleError if it has none."""
    text = _answer_text(answer, where).strip()
    if answer_type == "yesno":
        low = text.lower().rstrip(".")
        if low not in ("yes", "no"):
            raise _fail(where, "answer", f"a yesno answer must be 'yes' or 'no', got {brief_repr(answer)}")
        return low
    if answer_type in ("choice", "multi_choice"):
        letters = [part.strip().upper() for part in re.split(r"[,\s]+", text) if part.strip()]
        if not letters or any(len(x) != 1 or x not in OPTION_LETTERS for x in letters):
            raise _fail(
                where,
                "answer",
                f"a {answer_type} answer must be option letters like 'B' or 'A,C', got {brief_repr(answer)}",
            )
        if answer_type == "choice" and len(letters) != 1:
            raise _fail(where, "answer", f"a choice answer is one letter, got {brief_repr(answer)} (use multi_choice)")
        return ",".join(sorted(set(letters)))
    if answer_type == "number":
        if not _NUMBER.match(text.replace(",", "")):
            raise _fail(where, "answer", f"a number answer must be a decimal number, got {brief_repr(answer)}")
        return text.replace(",", "")
    if answer_type == "bbox":
        box = parse_box_field(text, where, "answer")
        return format_box(box)
    if answer_type == "labels":
        labels = [x.strip() for x in re.split(r"[,，、]+", text) if x.strip()]
        if not labels:
            raise _fail(where, "answer", "a labels answer needs at least one label")
        return ", ".join(labels)
    if answer_type in ("math", "string"):
        if not text:
            raise _fail(where, "answer", "the answer is empty")
        return text
    raise _fail(where, "answer_type", f"must be one of {ANSWER_TYPES}, got {brief_repr(answer_type)}")


def _answer_text(answer: Any, where: str) -> str:
    """The answer as text: a string, or a finite number written out; ExampleError otherwise."""
    if isinstance(answer, str):
        return check_text(where, "answer", answer)
    if not is_number(answer):
        raise _fail(where, "answer", f"must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, (float, np.floating)) and not math.isfinite(answer):
        raise _fail(where, "answer", f"must be a finite number, got {answer!r}")
    try:
        return str(answer)
    except ValueError as error:  # an int over Python's 4300-digit conversion limit
        raise _fail(where, "answer", f"a number too large to write out ({error})") from None


def format_box(box) -> str:
    """`[x1, y1, x2, y2]` with integers printed without a decimal point."""
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in box) + "]"


def _as_float(value: Any) -> float:
    """float(value), with an int beyond float range as inf (rejected by the caller) instead of OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def parse_box_field(value, where: str, field: str) -> list[float]:
    """A box given as a list of 4 numbers or the string "[x1, y1, x2, y2]", checked for x1<=x2, y1<=y2."""
    if isinstance(value, str):
        numbers = re.findall(r"[+-]?\d+(?:\.\d+)?", value, flags=re.ASCII)[:5]  # 5: enough to see it is not 4
        values = [_as_float(x) for x in numbers]
    elif isinstance(value, (list, tuple, np.ndarray)) and all(is_number(x) for x in value):
        values = [_as_float(x) for x in value]
    else:
        raise _fail(where, field, f"a box must be 4 numbers [x1, y1, x2, y2], got {brief_repr(value)}")
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise _fail(where, field, f"a box must be 4 finite numbers [x1, y1, x2, y2], got {brief_repr(value)}")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise _fail(where, field, f"a box needs x1 <= x2 and y1 <= y2, got {brief_repr(value)}")
    return values


def validate_example(example: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, checked copy of `example` (defaults filled in, answer canonical); raises ExampleError.

    Images must already be decoded (uint8 [H, W, 3]); the JSONL reader loads them before calling this.
    """
    where = example_location(example)
    unknown = set(example) - set(FIELDS)
    if unknown:
        raise _fail(where, sorted(unknown)[0], f"unknown field (known: {', '.join(FIELDS)})")
    for field in REQUIRED_FIELDS:
        value = example.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _fail(where, field, "missing or empty")
    out = {**DEFAULTS, **{k: v for k, v in example.items() if v is not None}}
    for field in ("id", "question", "task", "reasoning", "caption", "target", "source", "answer_type"):
        if not isinstance(out[field], str):
            raise _fail(where, field, f"must be a string, got {type(out[field]).__name__}")
        if field in TEXT_FIELDS:
            check_text(where, field, out[field])
    out["answer"] = canonical_answer(out["answer_type"], out["answer"], where)
    difficulty = out["difficulty"]
    if isinstance(difficulty, (bool, np.bool_)) or not isinstance(difficulty, (int, np.integer)) or difficulty < 0:
        raise _fail(where, "difficulty", f"must be an int >= 0, got {brief_repr(difficulty)}")
    out["difficulty"] = int(difficulty)
    bbox = out["bbox"]
    if not isinstance(bbox, (str, list, tuple, np.ndarray)):
        raise _fail(where, "bbox", f"must be 4 numbers [x1, y1, x2, y2] or [], got {brief_repr(bbox)}")
    out["bbox"] = [] if len(bbox) == 0 else parse_box_field(bbox, where, "bbox")
    if out["answer_type"] == "bbox" and not out["bbox"]:
        out["bbox"] = parse_box_field(out["answer"], where, "answer")
    options = out["options"]
    if not isinstance(options, (list, tuple)) or not all(isinstance(x, str) for x in options):
        raise _fail(where, "options", f"must be a list of strings, got {brief_repr(options)}")
    if len(options) > len(OPTION_LETTERS):
        raise _fail(where, "options", f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    for k, option in enumerate(options):
        check_text(where, f"options[{k}]", option)
    out["options"] = list(options)
    if options and out["answer_type"] in ("choice", "multi_choice"):
        for letter in out["answer"].split(","):
            if OPTION_LETTERS.index(letter) >= len(options):
                raise _fail(where, "answer", f"letter {letter} but only {len(options)} options")
    images = example.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        raise _fail(where, "images", f"must be a list of images, got {type(images).__name__}")
    checked = []
    for k, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
            raise _fail(where, "images", f"image {k} must be uint8 [H, W, 3], got {array.dtype} {array.shape}")
        checked.append(array)
    out["images"] = checked
    return out
