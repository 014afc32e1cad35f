"""The gym: procedurally generated visual-reasoning tasks (plus text-only word problems) as jaxvlm examples.

No data hub is reachable, so jaxvlm ships its own task suite, shaped after the curricula of the recipes it serves:
Curr-ReFT (yes/no -> multiple choice -> open-ended), CLGRPO (an abstract classification task: `mood`), Infi-MMR
(text-only reasoning -> caption-augmented -> caption-free: `word_arithmetic` and the `caption` field) and DyME
(a reference chain of thought, `reasoning`, on every example). Every example is a dict in the format of
`jaxvlm.data.example` and passes `validate_example` unchanged.

Scenes. A scene is a background colour (white or black) and 1..N non-overlapping shapes. A shape has a kind
(circle, square, triangle), a colour from `SHAPE_COLORS`, a size (small, medium, large: a radius of 8%, 13% or
18% of the image side) and an integer centre (cx, cy). Every kind fills exactly the square of side 2*radius around
its centre tightly, so its bounding box is

    [x1, y1, x2, y2] = [cx - r, cy - r, cx + r, cy + r]   in pixel-edge coordinates: x2 and y2 are EXCLUSIVE,

i.e. the shape's pixels are the columns x1..x2-1 and rows y1..y2-1, and each of those four edges touches a drawn
pixel. Shapes are drawn without anti-aliasing (every pixel is exactly a palette colour), at least one pixel from
the image border and at least two background pixels apart, so each shape is one connected component. A triangle
points up: row i of its box (0 at the top) is 2 * (i // 2 + 1) pixels wide, centred.

Tasks, by curriculum stage (`TASK_STAGE`; stage 0 is the text-only warm-up of Infi-MMR's first phase):
  0 word_arithmetic     word problems (+, -, x, /, two steps)                       -> number, no image
  1 exists              "Is there a red triangle in the image?" (alternating yes/no) -> yesno
  2 count_choice        "How many circles are there?" + 4 numeric options           -> choice
  2 colors_present      "Which colours appear in the image? ..." + 4 colour options  -> multi_choice (1+ correct)
  3 count               "How many blue shapes are there?"                           -> number
  3 largest_attribute   colour / kind of the largest shape (by pixel area, >= 1.25x the runner-up) -> string
  3 count_arithmetic    sum (easy), difference (medium), product (hard) of two counts -> number
  3 grounding           "Give the bounding box of the green square as [x1, y1, x2, y2]." (unique target) -> bbox
  3 mood                one label of MOOD_LABELS by the rule of `scene_mood`          -> labels
Opt-in (`EXTRA_TASKS`: only when a config names them; not in the default suite `TASKS`):
  0 word_problems       1-3 events of adding / taking away small numbers, in one sentence -> number, no image

Difficulty (0 easy, 1 medium, 2 hard) sets the number of shapes (`GymConfig.shape_counts`), the arithmetic
(count_arithmetic: +, -, x; word_arithmetic: one small step, multiplication / division / bigger numbers, two steps)
and for `count` allows two-attribute targets ("red circles"); for word_problems it is the number of events minus
one (`word_problem_steps`). Within a task the difficulty cycles through `GymConfig.difficulties`, so levels are
balanced (a level listed twice, as in (0, 0, 1), is drawn twice as often).

Splits. Each task draws candidate examples from its own deterministic stream (seeded by config seed, task and
candidate number). A candidate's *signature* is everything that determines it: task, scene spec and question
(options included). Its split is fixed by a hash of the signature, `split_of_signature`: the sha1 bucket mod 10000
falls in train (first 80%), validation (next 10%) or test (rest; `GymConfig.split_fractions`). A split keeps only
its own candidates and drops repeated signatures, so no example is in two splits (for any seed) or twice in one.

`GymSource` samples all example specs (cheap, pure Python) in its constructor and renders images (numpy) lazily in
`__getitem__`; same arguments give bit-identical examples in any process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxvlm.data.example import OPTION_LETTERS, format_box

TASKS = (
    "word_arithmetic",
    "exists",
    "count_choice",
    "colors_present",
    "count",
    "largest_attribute",
    "count_arithmetic",
    "grounding",
    "mood",
)
# Tasks a config names explicitly; not in TASKS (the default suite), so the default examples and the built-in
# tokenizer's corpus (`corpus_texts`) do not change with them.
EXTRA_TASKS = ("word_problems",)
ALL_TASKS = TASKS + EXTRA_TASKS
TEXT_ONLY_STAGE = 0
TASK_STAGE = {
    "word_arithmetic": TEXT_ONLY_STAGE,
    "exists": 1,
    "count_choice": 2,
    "colors_present": 2,
    "count": 3,
    "largest_attribute": 3,
    "count_arithmetic": 3,
    "grounding": 3,
    "mood": 3,
    "word_problems": TEXT_ONLY_STAGE,
}
TASK_ANSWER_TYPE = {
    "word_arithmetic": "number",
    "exists": "yesno",
    "count_choice": "choice",
    "colors_present": "multi_choice",
    "count": "number",
    "largest_attribute": "string",
    "count_arithmetic": "number",
    "grounding": "bbox",
    "mood": "labels",
    "word_problems": "number",
}
SPLITS = ("train", "validation", "test")

SHAPE_COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 180),
}
WARM_COLORS = ("red", "orange", "yellow")
COOL_COLORS = ("green", "blue", "purple")
BACKGROUND_COLORS = {"white": (255, 255, 255), "black": (0, 0, 0)}
DARK_BACKGROUNDS = ("black",)
SHAPE_KINDS = ("circle", "square", "triangle")
SIZE_FRACTIONS = {"small": 0.08, "medium": 0.13, "large": 0.18}
SIZES = tuple(SIZE_FRACTIONS)
MOOD_LABELS = ("cheerful", "calm", "gloomy", "tense")

BORDER = 1  # background pixels kept between a shape and the image edge
GAP = 2  # background pixels kept between two shapes' boxes
LARGEST_MARGIN = 1.25  # largest_attribute: the largest shape has at least this many times the runner-up's area


class GymSizeError(ValueError):
    """A split cannot reach the requested number of examples within the candidate budget."""


# ----------------------------------------------------------------------------------------------------- scenes


def radius_for(size: str, image_size: int) -> int:
    """The pixel radius (half side) of a shape of `size` in an image of side `image_size`."""
    return max(2, round(SIZE_FRACTIONS[size] * image_size))


@functools.cache
def shape_mask(kind: str, radius: int) -> np.ndarray:
    """Read-only bool mask [2r, 2r] of a shape's pixels inside its box; each edge of the box touches the shape."""
    side = 2 * radius
    offsets = np.arange(side) + 0.5 - radius  # pixel centres relative to the shape centre
    if kind == "square":
        mask = np.ones((side, side), bool)
    elif kind == "circle":
        mask = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    elif kind == "triangle":
        half_width = np.arange(side)[:, None] // 2 + 1
        columns = np.arange(side)[None, :]
        mask = (columns >= radius - half_width) & (columns < radius + half_width)
    else:
        raise ValueError(f"unknown shape kind {kind!r} (known: {', '.join(SHAPE_KINDS)})")
    mask.setflags(write=False)
    return mask


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape of a scene: kind, colour, size class and integer centre; `radius` is the half side in pixels."""

    kind: str
    color: str
    size: str
    cx: int
    cy: int
    radius: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """[x1, y1, x2, y2] with exclusive x2, y2: the tight box of the drawn pixels."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)

    @property
    def area(self) -> int:
        """Number of drawn pixels."""
        return int(shape_mask(self.kind, self.radius).sum())

    @property
    def name(self) -> str:
        """ "large red circle"."""
        return f"{self.size} {self.color} {self.kind}"

    def position(self, image_size: int) -> str:
        """Coarse position of the centre on a 3x3 grid: "at the top left", ..., "in the center"."""
        row = ("top", "middle", "bottom")[min(2, 3 * self.cy // image_size)]
        column = ("left", "center", "right")[min(2, 3 * self.cx // image_size)]
        return "in the center" if (row, column) == ("middle", "center") else f"at the {row} {column}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background colour and non-overlapping shapes, in reading order (by centre row, then column)."""

    image_size: int
    background: str
    shapes: tuple[Shape, ...]

    def signature(self) -> str:
        """Everything that determines the rendered image, as text."""
        shapes = ";".join(f"{s.kind},{s.color},{s.size},{s.cx},{s.cy},{s.radius}" for s in self.shapes)
        return f"{self.image_size}px,{self.background}:{shapes}"

    def inventory(self) -> str:
        """ "3 shapes on a white background: a large red circle, a small blue square and a medium blue triangle"."""
        count = len(self.shapes)
        names = _join([f"a {s.name}" for s in self.shapes])
        return f"{count} shape{'s' if count != 1 else ''} on a {self.background} background: {names}"

    def caption(self) -> str:
        """A faithful description: size, colour, kind and coarse position of every shape."""
        count = len(self.shapes)
        parts = _join([f"a {s.name} {s.position(self.image_size)}" for s in self.shapes])
        return (
            f"A {self.image_size}x{self.image_size} image on a {self.background} background with {count} "
            f"shape{'s' if count != 1 else ''}: {parts}."
        )


def _join(items: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _boxes_apart(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def sample_scene(
    rng: random.Random,
    image_size: int,
    num_shapes: int,
    *,
    background: str | None = None,
    warm_probability: float | None = None,
    kind_weights: Sequence[float] | None = None,
    attempts: int = 200,
) -> Scene:
    """A random scene with `num_shapes` shapes (cheap: no pixels are drawn).

    `background` fixes the background; `warm_probability` draws each colour from WARM_COLORS with that probability
    (else from COOL_COLORS) instead of uniformly from the palette; `kind_weights` weights SHAPE_KINDS.
    """
    colors = tuple(SHAPE_COLORS)
    for _ in range(attempts):
        chosen_background = background or rng.choice(tuple(BACKGROUND_COLORS))
        shapes: list[Shape] = []
        for _ in range(num_shapes):
            size = rng.choice(SIZES)
            kind = rng.choices(SHAPE_KINDS, weights=kind_weights)[0]
            if warm_probability is None:
                color = rng.choice(colors)
            else:
                color = rng.choice(WARM_COLORS if rng.random() < warm_probability else COOL_COLORS)
            radius = radius_for(size, image_size)
            low, high = BORDER + radius, image_size - BORDER - radius
            if low > high:
                break
            for _ in range(30):
                cx, cy = rng.randint(low, high), rng.randint(low, high)
                box = (cx - radius, cy - radius, cx + radius, cy + radius)
                if all(_boxes_apart(box, other.bbox) for other in shapes):
                    shapes.append(Shape(kind, color, size, cx, cy, radius))
                    break
            else:
                break
        else:
            ordered = tuple(sorted(shapes, key=lambda s: (s.cy, s.cx)))
            return Scene(image_size, chosen_background, ordered)
    raise RuntimeError(
        f"could not place {num_shapes} non-overlapping shapes in a {image_size}px image "
        f"in {attempts} attempts; lower GymConfig.shape_counts or raise image_size"
    )


def render_scene(scene: Scene) -> np.ndarray:
    """The scene drawn as uint8 [H, W, 3] RGB (deterministic, no anti-aliasing)."""
    image = np.empty((scene.image_size, scene.image_size, 3), np.uint8)
    image[:] = BACKGROUND_COLORS[scene.background]
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.bbox
        image[y1:y2, x1:x2][shape_mask(shape.kind, shape.radius)] = SHAPE_COLORS[shape.color]
    return image


def _tense_red_triangles(scene: Scene) -> int:
    """The number of red triangles when they make the scene tense (>= 2 and >= half the shapes), else 0."""
    red_triangles = sum(s.color == "red" and s.kind == "triangle" for s in scene.shapes)
    return red_triangles if red_triangles >= 2 and 2 * red_triangles >= len(scene.shapes) else 0


def scene_mood(scene: Scene) -> str | None:
    """The mood label of a scene's colour scheme, or None when warm and cool shapes tie (never asked).

    Rule, first match wins:
      1. at least two red triangles, making up at least half of the shapes -> "tense";
      2. more warm (red, orange, yellow) than cool (green, blue, purple) shapes:
         on a light (white) background -> "cheerful", on a dark (black) background -> "tense";
      3. more cool than warm shapes: light background -> "calm", dark background -> "gloomy".
    """
    if _tense_red_triangles(scene):
        return "tense"
    warm = sum(s.color in WARM_COLORS for s in scene.shapes)
    cool = len(scene.shapes) - warm
    dark = scene.background in DARK_BACKGROUNDS
    if warm > cool:
        return "tense" if dark else "cheerful"
    if cool > warm:
        return "gloomy" if dark else "calm"
    return None


# ---------------------------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class GymConfig:
    """What the gym generates; constructible from plain kwargs (lists are turned into tuples).

    image_size: side of the square images in pixels, a multiple of 28 (the vision tower's patch merge unit).
    tasks: the tasks to draw, in interleaving order (a subset of TASKS).
    difficulties: the levels drawn (cycled per task); each needs an entry in shape_counts.
    seed: seeds every candidate stream; different seeds give different examples, never crossing splits.
    shape_counts: (min, max) shapes, inclusive, per difficulty level 0, 1, 2.
    split_fractions: train, validation and test shares of the signature hash buckets (sum to 1).
    candidates_per_example: candidate budget per requested example (plus 1000) before GymSizeError.
    """

    image_size: int = 56
    tasks: tuple[str, ...] = TASKS
    difficulties: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    shape_counts: tuple[tuple[int, int], ...] = ((1, 3), (3, 4), (4, 6))
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    candidates_per_example: int = 100

    def __post_init__(self):
        set_field = functools.partial(object.__setattr__, self)
        set_field("tasks", tuple(self.tasks))
        set_field("difficulties", tuple(int(d) for d in self.difficulties))
        set_field("shape_counts", tuple((int(lo), int(hi)) for lo, hi in self.shape_counts))
        set_field("split_fractions", tuple(float(f) for f in self.split_fractions))
        if not isinstance(self.image_size, int) or self.image_size < 28 or self.image_size % 28:
            raise ValueError(f"GymConfig.image_size must be a positive multiple of 28, got {self.image_size!r}")
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"GymConfig.tasks must be distinct tasks of {ALL_TASKS}, got {self.tasks}")
        if not self.difficulties or any(not 0 <= d < len(self.shape_counts) for d in self.difficulties):
            raise ValueError(
                f"GymConfig.difficulties must be levels in 0..{len(self.shape_counts) - 1}, got {self.difficulties}"
            )
        if any(not 1 <= lo <= hi for lo, hi in self.shape_counts):
            raise ValueError(f"GymConfig.shape_counts needs 1 <= min <= max per level, got {self.shape_counts}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or abs(sum(self.split_fractions) - 1) > 1e-9:
            raise ValueError(f"GymConfig.split_fractions must be 3 shares summing to 1, got {self.split_fractions}")
        if self.candidates_per_example < 1:
            raise ValueError("GymConfig.candidates_per_example must be >= 1")

    @property
    def max_shapes(self) -> int:
        """The most shapes any configured difficulty puts in a scene."""
        return max(self.shape_counts[d][1] for d in self.difficulties)


# ---------------------------------------------------------------------------------------------- example specs


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """Everything of an example except its pixels; `scene` is None for text-only tasks."""

    id: str
    task: str
    difficulty: int
    question: str
    answer: str
    options: tuple[str, ...]
    bbox: tuple[float, ...]
    reasoning: str
    scene: Scene | None

    @property
    def signature(self) -> str:
        """Task, scene spec and question: the content that decides the split and deduplication."""
        return f"{self.task}|{self.scene.signature() if self.scene else ''}|{self.question}"

    def to_example(self) -> dict[str, Any]:
        """The example dict (format of `jaxvlm.data.example`), rendering the image."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "answer_type": TASK_ANSWER_TYPE[self.task],
            "task": self.task,
            "images": [render_scene(self.scene)] if self.scene else [],
            "reasoning": self.reasoning,
            "caption": self.scene.caption() if self.scene else "",
            "difficulty": self.difficulty,
            "bbox": list(self.bbox),
            "options": list(self.options),
            "source": "gym",
        }


def split_of_signature(signature: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split an example with this signature belongs to: sha1 bucket mod 10000 against the cumulative shares."""
    bucket = int.from_bytes(hashlib.sha1(signature.encode()).digest()[:8], "big") % 10_000
    if bucket < round(10_000 * fractions[0]):
        return "train"
    if bucket < round(10_000 * (fractions[0] + fractions[1])):
        return "validation"
    return "test"


@dataclasses.dataclass
class _Draw:
    """One candidate's randomness and targets, handed to a task's maker."""

    rng: random.Random
    image_size: int
    difficulty: int
    slot: int  # how many examples of this task the split already holds: drives balanced answers / labels
    shape_range: tuple[int, int]

    def scene(self, min_shapes: int = 1, **kwargs) -> Scene:
        lo, hi = self.shape_range
        count = self.rng.randint(max(lo, min(min_shapes, hi)), hi)
        return sample_scene(self.rng, self.image_size, count, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Target:
    """A set of shapes named by colour, kind or both: "red shapes", "circles", "red circles"."""

    color: str | None = None
    kind: str | None = None

    def matches(self, shape: Shape) -> bool:
        return (self.color is None or shape.color == self.color) and (self.kind is None or shape.kind == self.kind)

    def phrase(self, plural: bool = True) -> str:
        noun = self.kind or "shape"
        noun = noun + "s" if plural else noun
        return f"{self.color} {noun}" if self.color else noun

    def count_sentence(self, scene: Scene) -> tuple[int, str]:
        """(count, "The red shapes are the ... and the ..., so there are 2 red shapes.")."""
        chosen = [s for s in scene.shapes if self.matches(s)]
        phrase, n = self.phrase(), len(chosen)
        if n == 0:
            what = self.color if self.kind is None else f"a {self.phrase(plural=False)}"
            return 0, f"None of the shapes is {what}, so there are 0 {phrase}."
        names = _join([f"the {s.name}" for s in chosen])
        if n == 1:
            return 1, f"The only {self.phrase(plural=False)} is {names}, so there is 1 {self.phrase(plural=False)}."
        return n, f"The {phrase} are {names}, so there are {n} {phrase}."


def _random_target(rng: random.Random, scene: Scene, *, both: bool = False, present: bool = True) -> _Target:
    """A target by colour or kind (or both) taken from a shape of the scene, or any when not `present`."""
    shape = rng.choice(scene.shapes)
    color = shape.color if present else rng.choice(tuple(SHAPE_COLORS))
    kind = shape.kind if present else rng.choice(SHAPE_KINDS)
    if both:
        return _Target(color, kind)
    return _Target(color=color) if rng.random() < 0.5 else _Target(kind=kind)


def _make_exists(draw: _Draw) -> dict:
    scene = draw.scene()
    present = {(s.color, s.kind) for s in scene.shapes}
    if draw.slot % 2 == 0:  # yes
        shape = draw.rng.choice(scene.shapes)
        color, kind = shape.color, shape.kind
        because = f"The {shape.name} {shape.position(scene.image_size)} is a {color} {kind}, so there is one."
    else:  # no: prefer a near miss sharing the colour or the kind of a shape in the scene
        absent = [(c, k) for c in SHAPE_COLORS for k in SHAPE_KINDS if (c, k) not in present]
        near = [(c, k) for c, k in absent if any(c == pc or k == pk for pc, pk in present)]
        color, kind = draw.rng.choice(near if near and draw.rng.random() < 0.7 else absent)
        because = f"None of the shapes is a {color} {kind}."
    answer = "yes" if draw.slot % 2 == 0 else "no"
    return dict(
        scene=scene,
        question=f"Is there a {color} {kind} in the image?",
        answer=answer,
        reasoning=f"The image shows {scene.inventory()}. {because} The answer is {answer}.",
    )


def _options_text(options: Sequence[str]) -> str:
    return "\n".join(f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(options))


def _make_count_choice(draw: _Draw) -> dict:
    scene = draw.scene()
    target = _random_target(draw.rng, scene)
    count, sentence = target.count_sentence(scene)
    start = max(0, count - draw.rng.randint(0, 3))
    options = tuple(str(start + i) for i in range(4))
    letter = OPTION_LETTERS[count - start]
    question = f"How many {target.phrase()} are there?\n{_options_text(options)}"
    return dict(
        scene=scene,
        question=question,
        answer=letter,
        options=options,
        reasoning=f"The image shows {scene.inventory()}. {sentence} That is option {letter}. The answer is {letter}.",
    )


def _make_colors_present(draw: _Draw) -> dict:
    scene = draw.scene()
    present = sorted({s.color for s in scene.shapes}, key=tuple(SHAPE_COLORS).index)
    absent = [c for c in SHAPE_COLORS if c not in present]
    num_correct = draw.rng.randint(max(1, 4 - len(absent)), min(4, len(present)))
    options = draw.rng.sample(present, num_correct) + draw.rng.sample(absent, 4 - num_correct)
    draw.rng.shuffle(options)
    letters = [OPTION_LETTERS[i] for i, c in enumerate(options) if c in present]
    answer = ",".join(letters)
    shown = _join([f"{c} ({OPTION_LETTERS[i]})" for i, c in enumerate(options) if c in present])
    missing = [f"{c} ({OPTION_LETTERS[i]})" for i, c in enumerate(options) if c not in present]
    verdict = f"Of the options, {shown} appear{'s' if num_correct == 1 else ''}"
    verdict += f" and {_join(missing)} do{'es' if len(missing) == 1 else ''} not." if missing else "."
    question = f"Which colours appear in the image? Select all that apply.\n{_options_text(options)}"
    return dict(
        scene=scene,
        question=question,
        answer=answer,
        options=tuple(options),
        reasoning=f"The image shows {scene.inventory()}. The shapes' colours are {_join(present)}. "
        f"{verdict} The answer is {answer}.",
    )


def _make_count(draw: _Draw) -> dict:
    scene = draw.scene()
    both = draw.difficulty >= 2 and draw.rng.random() < 0.5
    target = _random_target(draw.rng, scene, both=both, present=draw.rng.random() >= 0.1)
    count, sentence = target.count_sentence(scene)
    return dict(
        scene=scene,
        question=f"How many {target.phrase()} are there?",
        answer=str(count),
        reasoning=f"The image shows {scene.inventory()}. {sentence} The answer is {count}.",
    )


def _make_largest_attribute(draw: _Draw) -> dict:
    for _ in range(100):
        scene = draw.scene(min_shapes=2)
        by_area = sorted(scene.shapes, key=lambda s: s.area, reverse=True)
        if len(by_area) == 1 or by_area[0].area >= LARGEST_MARGIN * by_area[1].area:
            break
    else:
        raise RuntimeError("no scene with a clearly largest shape in 100 tries")
    largest = by_area[0]
    if draw.slot % 2 == 0:
        question, answer, attribute = "What colour is the largest shape?", largest.color, "colour"
    else:
        question, answer, attribute = "What shape is the largest object?", largest.kind, "shape"
    if len(scene.shapes) == 1:
        why = f"It is the only shape, so the {largest.name} is the largest."
    else:
        why = f"The largest shape is the {largest.name}; every other shape is clearly smaller."
    return dict(
        scene=scene,
        question=question,
        answer=answer,
        reasoning=f"The image shows {scene.inventory()}. {why} Its {attribute} is {answer}. The answer is {answer}.",
    )


def _target_pair(draw: _Draw, scene: Scene) -> tuple[_Target, _Target]:
    """Two distinct targets of the same attribute (colour or kind), the first present in the scene."""
    shape = draw.rng.choice(scene.shapes)
    if draw.rng.random() < 0.5:
        other = draw.rng.choice([c for c in SHAPE_COLORS if c != shape.color])
        return _Target(color=shape.color), _Target(color=other)
    other = draw.rng.choice([k for k in SHAPE_KINDS if k != shape.kind])
    return _Target(kind=shape.kind), _Target(kind=other)


def _make_count_arithmetic(draw: _Draw) -> dict:
    scene = draw.scene()
    first, second = _target_pair(draw, scene)
    a, a_sentence = first.count_sentence(scene)
    b, b_sentence = second.count_sentence(scene)
    if draw.difficulty == 0:
        question = f"How many {first.phrase()} and {second.phrase()} are there in total?"
        answer, step = a + b, f"In total that is {a} + {b} = {a + b}."
    elif draw.difficulty == 1:
        if a < b:
            first, second, a, b, a_sentence, b_sentence = second, first, b, a, b_sentence, a_sentence
        question = f"How many more {first.phrase()} than {second.phrase()} are there?"
        answer, step = a - b, f"The difference is {a} - {b} = {a - b}."
    else:
        question = f"What is the number of {first.phrase()} times the number of {second.phrase()}?"
        answer, step = a * b, f"The product is {a} x {b} = {a * b}."
    return dict(
        scene=scene,
        question=question,
        answer=str(answer),
        reasoning=f"The image shows {scene.inventory()}. {a_sentence} {b_sentence} {step} The answer is {answer}.",
    )


def _make_grounding(draw: _Draw) -> dict:
    for _ in range(100):
        scene = draw.scene()
        combos = [(s.color, s.kind) for s in scene.shapes]
        unique = [s for s in scene.shapes if combos.count((s.color, s.kind)) == 1]
        if unique:
            break
    else:
        raise RuntimeError("no scene with a uniquely named shape in 100 tries")
    target = draw.rng.choice(unique)
    x1, y1, x2, y2 = target.bbox
    answer = format_box(target.bbox)
    return dict(
        scene=scene,
        question=f"Give the bounding box of the {target.color} {target.kind} as [x1, y1, x2, y2].",
        answer=answer,
        bbox=tuple(float(v) for v in target.bbox),
        reasoning=f"The image shows {scene.inventory()}. The only {target.color} {target.kind} is the "
        f"{target.name} {target.position(scene.image_size)}. Its pixels span columns {x1} to "
        f"{x2 - 1} and rows {y1} to {y2 - 1}, so its box, with exclusive right and bottom "
        f"edges, is {answer}. The answer is {answer}.",
    )


_MOOD_SAMPLING = {  # label -> (background, probability of a warm colour) that make the label likely
    "cheerful": ("white", 0.8),
    "calm": ("white", 0.2),
    "gloomy": ("black", 0.2),
    "tense": ("black", 0.8),
}


def _mood_explanation(scene: Scene, label: str) -> str:
    red_triangles = _tense_red_triangles(scene)
    if red_triangles:
        return (
            f"There are {red_triangles} red triangles, at least half of the {len(scene.shapes)} shapes, "
            f"and many sharp red shapes make a scene tense."
        )
    warm = [s.color for s in scene.shapes if s.color in WARM_COLORS]
    cool = [s.color for s in scene.shapes if s.color in COOL_COLORS]
    tone = "dark" if scene.background in DARK_BACKGROUNDS else "light"
    major = "warm" if len(warm) > len(cool) else "cool"
    return (
        f"The background is {scene.background}, which is {tone}. There are {len(warm)} warm-coloured and "
        f"{len(cool)} cool-coloured shapes, so {major} colours dominate. A {tone} background with mostly "
        f"{major} colours feels {label}."
    )


def _make_mood(draw: _Draw) -> dict:
    label = MOOD_LABELS[draw.slot % len(MOOD_LABELS)]
    background, warm_probability = _MOOD_SAMPLING[label]
    kind_weights = (1, 1, 2) if label == "tense" else None
    for _ in range(200):
        scene = draw.scene(background=background, warm_probability=warm_probability, kind_weights=kind_weights)
        if scene_mood(scene) == label:
            break
    else:
        raise RuntimeError(f"no {label} scene in 200 tries")
    question = f"Which mood does the scene's colour scheme convey? Choose one of: {', '.join(MOOD_LABELS)}."
    return dict(
        scene=scene,
        question=question,
        answer=label,
        reasoning=f"The image shows {scene.inventory()}. {_mood_explanation(scene, label)} The answer is {label}.",
    )


_NAMES = ("Tom", "Anna", "Ben", "Maya", "Leo", "Sara", "Omar", "Lily")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells")
_CONTAINERS = ("bags", "boxes", "packs", "jars")


def _make_word_arithmetic(draw: _Draw) -> dict:
    rng = draw.rng
    name, friend = rng.sample(_NAMES, 2)
    items, containers = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    form = rng.randrange(2)
    if draw.difficulty == 0 or (draw.difficulty == 1 and rng.random() < 0.3):
        top = 10 if draw.difficulty == 0 else 60
        if form == 0:
            a, b = rng.randint(2, top), rng.randint(2, top)
            answer = a + b
            question = f"{name} has {a} {items} and buys {b} more. How many {items} does {name} have now?"
            steps = f"{name} starts with {a} {items} and buys {b} more, so {name} has {a} + {b} = {answer} {items}."
        else:
            a = rng.randint(3, top + 2)
            b = rng.randint(1, a - 1)
            answer = a - b
            question = f"{name} has {a} {items} and gives {b} to {friend}. How many {items} does {name} have left?"
            steps = f"{name} starts with {a} {items} and gives away {b}, so {a} - {b} = {answer} {items} are left."
    elif draw.difficulty == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        if form == 0:
            answer = a * b
            question = (
                f"{name} has {a} {containers} with {b} {items} in each. How many {items} does {name} have in total?"
            )
            steps = f"{a} {containers} with {b} {items} each make {a} x {b} = {answer} {items}."
        else:
            answer = b
            question = (
                f"{name} shares {a * b} {items} equally among {a} friends. How many {items} does each friend get?"
            )
            steps = f"Sharing {a * b} {items} among {a} friends gives each {a * b} / {a} = {answer} {items}."
    else:
        if form == 0:
            a, b = rng.randint(5, 30), rng.randint(2, 20)
            c = rng.randint(1, a + b - 1)
            answer = a + b - c
            question = (
                f"{name} has {a} {items}, buys {b} more and then gives {c} to {friend}. "
                f"How many {items} does {name} have now?"
            )
            steps = (
                f"After buying, {name} has {a} + {b} = {a + b} {items}. After giving {c} away, "
                f"{name} has {a + b} - {c} = {answer} {items}."
            )
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            c = rng.randint(1, a * b - 1)
            answer = a * b - c
            question = (
                f"{name} buys {a} {containers} of {b} {items} and gives away {c} of them. "
                f"How many {items} does {name} have left?"
            )
            steps = (
                f"{a} {containers} of {b} {items} make {a} x {b} = {a * b} {items}. Giving away {c} "
                f"leaves {a * b} - {c} = {answer} {items}."
            )
    return dict(scene=None, question=question, answer=str(answer), reasoning=f"{steps} The answer is {answer}.")


# word_problems: 1-3 events, each adding or taking away a few items, in one sentence ("Tom has 5 apples, buys 3 more
# and then gives 2 to Anna."). An event is (its verb phrase in the question, its gerund phrase in the reference);
# {friend} is the other person, {n} the number of items moved.
_GAIN_EVENTS = (
    ("buys {n} more", "buying {n} more"),
    ("finds {n} more", "finding {n} more"),
    ("gets {n} more from {friend}", "getting {n} more from {friend}"),
)
_LOSS_EVENTS = (
    ("gives {n} to {friend}", "giving {n} to {friend}"),
    ("loses {n}", "losing {n}"),
    ("sells {n}", "selling {n}"),
)
WORD_PROBLEM_START = (2, 12)  # the items owned at first, inclusive
WORD_PROBLEM_CHANGE = (1, 9)  # the items one event adds or takes away, inclusive (never all of them)


def word_problem_steps(difficulty: int) -> int:
    """The number of events (additions or subtractions) in a word_problems example at `difficulty` (0, 1, 2)."""
    return difficulty + 1


def _make_word_problems(draw: _Draw) -> dict:
    """A word problem of `word_problem_steps(difficulty)` events in one sentence; every intermediate count stays
    >= 1. The reference writes out each event's arithmetic ("After buying 3 more, Tom has 5 + 3 = 8 apples.") and
    ends "The answer is N."."""
    rng = draw.rng
    name, friend = rng.sample(_NAMES, 2)
    items = rng.choice(_ITEMS)
    start = count = rng.randint(*WORD_PROBLEM_START)
    phrases, steps = [], [f"{name} starts with {start} {items}."]
    for _ in range(word_problem_steps(draw.difficulty)):
        gain = count < 2 or rng.random() < 0.5
        low, high = WORD_PROBLEM_CHANGE
        n = rng.randint(low, high) if gain else rng.randint(low, min(high, count - 1))
        verb_phrase, gerund = rng.choice(_GAIN_EVENTS if gain else _LOSS_EVENTS)
        phrases.append(verb_phrase.format(friend=friend, n=n))
        new = count + n if gain else count - n
        noun = items if new != 1 else items[:-1]  # "1 apple": every item word is a plural in -s
        sign = "+" if gain else "-"
        steps.append(f"After {gerund.format(friend=friend, n=n)}, {name} has {count} {sign} {n} = {new} {noun}.")
        count = new
    if len(phrases) == 1:
        events = f" and {phrases[0]}"
    else:
        events = ", " + ", ".join(phrases[:-1]) + f" and then {phrases[-1]}"
    return dict(
        scene=None,
        question=f"{name} has {start} {items}{events}. How many {items} does {name} have now?",
        answer=str(count),
        reasoning=" ".join(steps) + f" The answer is {count}.",
    )


_MAKERS = {
    "word_arithmetic": _make_word_arithmetic,
    "exists": _make_exists,
    "count_choice": _make_count_choice,
    "colors_present": _make_colors_present,
    "count": _make_count,
    "largest_attribute": _make_largest_attribute,
    "count_arithmetic": _make_count_arithmetic,
    "grounding": _make_grounding,
    "mood": _make_mood,
    "word_problems": _make_word_problems,
}


def _candidate_rng(seed: int, task: str, candidate: int) -> random.Random:
    digest = hashlib.sha256(f"jaxvlm-gym/{seed}/{task}/{candidate}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def task_specs(task: str, split: str, count: int, config: GymConfig) -> list[ExampleSpec]:
    """The first `count` distinct candidates of `task`'s stream that belong to `split` (ids gym/split/task/k)."""
    if task not in _MAKERS:
        raise ValueError(f"unknown gym task {task!r} (known: {', '.join(ALL_TASKS)})")
    budget = config.candidates_per_example * count + 1000
    specs: list[ExampleSpec] = []
    seen: set[str] = set()
    candidate = 0
    while len(specs) < count:
        if candidate >= budget:
            raise GymSizeError(
                f"gym task {task!r}: only {len(specs)} of {count} distinct {split} examples after {budget} "
                f"candidates (its space is too small for this size); ask for fewer examples, or use more "
                f"difficulties or a larger image_size"
            )
        slot = len(specs)
        difficulty = config.difficulties[slot % len(config.difficulties)]
        draw = _Draw(
            _candidate_rng(config.seed, task, candidate),
            config.image_size,
            difficulty,
            slot,
            config.shape_counts[difficulty],
        )
        candidate += 1
        fields = _MAKERS[task](draw)
        spec = ExampleSpec(
            id=f"gym/{split}/{task}/{slot}",
            task=task,
            difficulty=difficulty,
            question=fields["question"],
            answer=fields["answer"],
            options=tuple(fields.get("options", ())),
            bbox=tuple(fields.get("bbox", ())),
            reasoning=fields["reasoning"],
            scene=fields["scene"],
        )
        signature = spec.signature
        if signature in seen or split_of_signature(signature, config.split_fractions) != split:
            continue
        seen.add(signature)
        specs.append(spec)
    return specs


def build_specs(
    split: str, num_examples: int, config: GymConfig, tasks: Sequence[str] | None = None
) -> list[ExampleSpec]:
    """`num_examples` specs of `split`, interleaving the tasks: example i is of task tasks[i % len(tasks)]."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    tasks = tuple(config.tasks if tasks is None else tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct and at least one, got {tasks}")
    per_task = [
        task_specs(task, split, len(range(j, num_examples, len(tasks))), config) for j, task in enumerate(tasks)
    ]
    return [per_task[i % len(tasks)][i // len(tasks)] for i in range(num_examples)]


class GymSource:
    """A grain random-access data source of gym examples (`len`, `source[i]` -> example dict).

    All example specs are sampled in the constructor; images are rendered on access. Picklable, and
    deterministic: the same (split, num_examples, config, tasks) give bit-identical examples in any process.
    """

    def __init__(
        self, split: str, num_examples: int, config: GymConfig = GymConfig(), tasks: Sequence[str] | None = None
    ):
        self.split = split
        self.config = config
        self.tasks = tuple(config.tasks if tasks is None else tasks)
        self._specs = build_specs(split, num_examples, config, self.tasks)

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.spec(index).to_example()

    def spec(self, index: int) -> ExampleSpec:
        """The example's spec (scene, question, answer, ...) without rendering."""
        index = int(index)
        if not -len(self._specs) <= index < len(self._specs):
            raise IndexError(f"index {index} out of range for {self!r}")
        return self._specs[index]

    def __repr__(self) -> str:
        return (
            f"GymSource(split={self.split!r}, num_examples={len(self)}, tasks={self.tasks}, "
            f"image_size={self.config.image_size}, seed={self.config.seed})"
        )


def corpus_texts(config: GymConfig = GymConfig(), num_examples: int = 2000) -> list[str]:
    """Questions, reasoning, captions, answers and option texts of `num_examples` training examples over all
    TASKS (nothing is rendered): text to train the built-in BPE tokenizer on."""
    config = dataclasses.replace(config, tasks=TASKS)
    texts: list[str] = []
    for spec in build_specs("train", num_examples, config):
        texts += [spec.question, spec.reasoning, spec.answer, *spec.options]
        if spec.scene is not None:
            texts.append(spec.scene.caption())
    return texts
