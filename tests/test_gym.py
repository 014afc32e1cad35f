"""The gym (`jaxvlm.data.gym`) and its tensorflow-datasets builder (`jaxvlm.data.tfds_gym`).

Answers are checked independently of the generator where possible: the shapes are recovered from the rendered
pixels (connected components; kind from the component's fill and top row) and every answer is recomputed from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys

import grain
import numpy as np
import pytest

from jaxvlm.data import gym
from jaxvlm.data.example import OPTION_LETTERS, validate_example
from jaxvlm.data.gym import GymConfig, GymSizeError, GymSource, Scene, Shape

COLOR_OF_RGB = {rgb: name for name, rgb in gym.SHAPE_COLORS.items()}
BACKGROUND_OF_RGB = {rgb: name for name, rgb in gym.BACKGROUND_COLORS.items()}
PER_TASK = 24


@pytest.fixture(scope="module")
def train():
    return GymSource("train", PER_TASK * len(gym.TASKS))


@pytest.fixture(scope="module")
def examples(train):
    return [train[i] for i in range(len(train))]


def by_task(examples, task):
    chosen = [e for e in examples if e["task"] == task]
    assert len(chosen) == PER_TASK
    return chosen


def pixel_shapes(image: np.ndarray) -> tuple[str, list[dict]]:
    """(background name, shapes seen in the pixels): one shape per 4-connected non-background component."""
    background = tuple(int(v) for v in image[0, 0])
    foreground = np.any(image != np.array(background, np.uint8), axis=-1)
    seen = np.zeros_like(foreground)
    height, width = foreground.shape
    shapes = []
    for y0, x0 in zip(*np.nonzero(foreground)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        ys, xs = np.array(pixels).T
        colors = {tuple(int(v) for v in image[y, x]) for y, x in pixels}
        assert len(colors) == 1, "a component mixes colours: shapes touch or are anti-aliased"
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        fill = len(pixels) / ((box[2] - box[0]) * (box[3] - box[1]))
        top_row_width = int(np.sum(ys == ys.min()))
        kind = "square" if fill == 1 else "triangle" if top_row_width == 2 else "circle"
        shapes.append(dict(color=COLOR_OF_RGB[colors.pop()], kind=kind, area=len(pixels), box=box))
    return BACKGROUND_OF_RGB[background], shapes


def phrase_count(phrase: str, shapes: list[dict]) -> int:
    """Number of shapes named by "red shapes", "circles" or "red circles"."""
    words = phrase.split()
    kind = None if words[-1] == "shapes" else words[-1].removesuffix("s")
    color = words[0] if len(words) == 2 else None
    assert kind in (None, *gym.SHAPE_KINDS) and color in (None, *gym.SHAPE_COLORS), phrase
    return sum((color is None or s["color"] == color) and (kind is None or s["kind"] == kind) for s in shapes)


def bare_question(question: str) -> str:
    return question.split("\n")[0]


# ------------------------------------------------------------------------------------------ format and config


def test_every_task_validates_unchanged(examples):
    assert {e["task"] for e in examples} == set(gym.TASKS)
    for example in examples:
        checked = validate_example(example)
        for field, value in example.items():
            if field == "images":
                assert len(checked[field]) == len(value)
                assert all(np.array_equal(a, b) for a, b in zip(checked[field], value))
            else:
                assert checked[field] == value, (example["id"], field)
        assert example["answer_type"] == gym.TASK_ANSWER_TYPE[example["task"]]
        assert example["source"] == "gym" and example["id"].startswith(f"gym/train/{example['task']}/")
        assert not re.search(r"<think>|<answer>|Answer:", example["question"] + example["reasoning"])
        if example["task"] == "word_arithmetic":
            assert example["images"] == [] and example["caption"] == ""
        else:
            assert len(example["images"]) == 1
            assert example["images"][0].shape == (56, 56, 3) and example["images"][0].dtype == np.uint8
        if example["answer_type"] in ("choice", "multi_choice"):
            lines = example["question"].split("\n")[1:]
            assert lines == [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(example["options"])]
        else:
            assert example["options"] == [] and "\n" not in example["question"]


def test_config_validation_and_kwargs():
    for bad in (50, 0, -28, 28.0):
        with pytest.raises(ValueError, match="multiple of 28"):
            GymConfig(image_size=bad)
    with pytest.raises(ValueError, match="tasks"):
        GymConfig(tasks=("count", "juggling"))
    with pytest.raises(ValueError, match="difficulties"):
        GymConfig(difficulties=(3,))
    with pytest.raises(ValueError, match="split_fractions"):
        GymConfig(split_fractions=(0.8, 0.1, 0.2))
    config = GymConfig(
        **{"image_size": 112, "tasks": ["count", "mood"], "difficulties": [2], "shape_counts": [[1, 2], [2, 3], [3, 5]]}
    )
    assert config.tasks == ("count", "mood") and config.shape_counts[2] == (3, 5) and config.max_shapes == 5
    hash(config)
    example = GymSource("validation", 4, config)[0]
    assert example["images"][0].shape == (112, 112, 3) and example["difficulty"] == 2
    with pytest.raises(ValueError, match="split"):
        GymSource("dev", 3)


def test_difficulty_cycles_and_sets_shape_counts(train):
    config = train.config
    for task in gym.TASKS:
        specs = [train.spec(i) for i in range(len(train)) if train.spec(i).task == task]
        assert [s.difficulty for s in specs] == [config.difficulties[k % 3] for k in range(len(specs))]
        for spec in specs:
            if spec.scene is not None:
                low, high = config.shape_counts[spec.difficulty]
                assert low <= len(spec.scene.shapes) <= high, spec.id


# ------------------------------------------------------------------------------- determinism and splits


def digest(source: GymSource) -> str:
    hasher = hashlib.sha256()
    for i in range(len(source)):
        example = source[i]
        hasher.update(json.dumps({k: v for k, v in example.items() if k != "images"}, sort_keys=True).encode())
        for image in example["images"]:
            hasher.update(image.tobytes())
    return hasher.hexdigest()


def test_deterministic_across_processes_and_seed_dependent():
    config = GymConfig(seed=3)
    first, second = GymSource("validation", 27, config), GymSource("validation", 27, config)
    assert digest(first) == digest(second)
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import test_gym; "
        "print(test_gym.digest(test_gym.GymSource('validation', 27, test_gym.GymConfig(seed=3))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == digest(first)
    other = GymSource("validation", 27, GymConfig(seed=4))
    assert digest(other) != digest(first)
    questions = lambda source: [source[i]["question"] for i in range(len(source))]  # noqa: E731
    assert questions(other) != questions(first)
    image_pairs = [(first[i]["images"], other[i]["images"]) for i in range(len(first)) if first[i]["images"]]
    assert sum(not np.array_equal(a[0], b[0]) for a, b in image_pairs) >= len(image_pairs) - 1


def test_splits_are_disjoint_and_deduplicated():
    signatures = {}
    for split, size in (("train", 450), ("validation", 90), ("test", 90)):
        source = GymSource(split, size)
        specs = [source.spec(i) for i in range(size)]
        signatures[split] = [s.signature for s in specs]
        assert len(set(signatures[split])) == size, f"duplicate in {split}"
        assert len({s.id for s in specs}) == size
        assert all(gym.split_of_signature(s) == split for s in signatures[split])
    assert not set(signatures["train"]) & set(signatures["validation"])
    assert not set(signatures["train"]) & set(signatures["test"])
    assert not set(signatures["validation"]) & set(signatures["test"])
    # A small space (easy word problems) repeats candidates: the split keeps each signature once.
    small = GymSource("train", 600, GymConfig(tasks=("word_arithmetic",), difficulties=(0,)))
    assert len({small[i]["question"] for i in range(600)}) == 600
    other_seed = GymSource("test", 90, GymConfig(seed=1))
    assert not {other_seed.spec(i).signature for i in range(90)} & set(signatures["train"])
    buckets = [gym.split_of_signature(f"probe {i}") for i in range(4000)]
    assert abs(buckets.count("train") / 4000 - 0.8) < 0.03 and abs(buckets.count("test") / 4000 - 0.1) < 0.02


def test_balanced_interleaving():
    source = GymSource("train", 20, tasks=("count", "exists", "mood"))
    tasks = [source[i]["task"] for i in range(20)]
    assert tasks == [("count", "exists", "mood")[i % 3] for i in range(20)]
    assert [tasks.count(t) for t in ("count", "exists", "mood")] == [7, 7, 6]
    assert source[19]["id"] == "gym/train/exists/6"
    with pytest.raises(IndexError):
        source[20]


def test_unreachable_size_raises_a_clear_error():
    config = GymConfig(tasks=("word_arithmetic",), candidates_per_example=1)
    with pytest.raises(GymSizeError, match="word_arithmetic.*fewer examples"):
        GymSource("validation", 2000, config)


# ----------------------------------------------------------------------------------- answers from pixels


def check_exists(example, background, shapes):
    color, kind = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", example["question"]).groups()
    present = any(s["color"] == color and s["kind"] == kind for s in shapes)
    assert example["answer"] == ("yes" if present else "no")


def check_count_choice(example, background, shapes):
    phrase = re.fullmatch(r"How many (.+) are there\?", bare_question(example["question"])).group(1)
    options = example["options"]
    assert len(options) == 4 and len(set(options)) == 4
    assert options[OPTION_LETTERS.index(example["answer"])] == str(phrase_count(phrase, shapes))


def check_colors_present(example, background, shapes):
    options = example["options"]
    assert len(options) == 4 and len(set(options)) == 4 and set(options) <= set(gym.SHAPE_COLORS)
    seen = {s["color"] for s in shapes}
    expected = [OPTION_LETTERS[i] for i, color in enumerate(options) if color in seen]
    assert expected and example["answer"] == ",".join(expected)


def check_count(example, background, shapes):
    phrase = re.fullmatch(r"How many (.+) are there\?", example["question"]).group(1)
    assert example["answer"] == str(phrase_count(phrase, shapes))


def check_largest_attribute(example, background, shapes):
    areas = sorted((s["area"] for s in shapes), reverse=True)
    largest = max(shapes, key=lambda s: s["area"])
    assert len(areas) == 1 or areas[0] >= gym.LARGEST_MARGIN * areas[1]
    attribute = {"What colour is the largest shape?": "color", "What shape is the largest object?": "kind"}
    assert example["answer"] == largest[attribute[example["question"]]]


def check_count_arithmetic(example, background, shapes):
    forms = {
        r"How many (.+) and (.+) are there in total\?": (0, lambda a, b: a + b),
        r"How many more (.+) than (.+) are there\?": (1, lambda a, b: a - b),
        r"What is the number of (.+) times the number of (.+)\?": (2, lambda a, b: a * b),
    }
    matched = [(form, rule) for form, rule in forms.items() if re.fullmatch(form, example["question"])]
    assert len(matched) == 1, example["question"]
    form, (difficulty, operation) = matched[0]
    first, second = (phrase_count(p, shapes) for p in re.fullmatch(form, example["question"]).groups())
    assert example["difficulty"] == difficulty
    assert int(example["answer"]) == operation(first, second) >= 0


def check_grounding(example, background, shapes):
    color, kind = re.fullmatch(
        r"Give the bounding box of the (\w+) (\w+) as \[x1, y1, x2, y2\]\.", example["question"]
    ).groups()
    matches = [s for s in shapes if s["color"] == color and s["kind"] == kind]
    assert len(matches) == 1
    box = matches[0]["box"]
    assert example["bbox"] == [float(v) for v in box]
    assert example["answer"] == "[" + ", ".join(str(v) for v in box) + "]"


def check_mood(example, background, shapes):
    # The rule documented in gym.scene_mood, applied to what the pixels show.
    red_triangles = sum(s["color"] == "red" and s["kind"] == "triangle" for s in shapes)
    warm = sum(s["color"] in ("red", "orange", "yellow") for s in shapes)
    cool = len(shapes) - warm
    assert warm != cool
    if red_triangles >= 2 and 2 * red_triangles >= len(shapes):
        expected = "tense"
    elif warm > cool:
        expected = "tense" if background == "black" else "cheerful"
    else:
        expected = "gloomy" if background == "black" else "calm"
    assert example["answer"] == expected
    assert example["question"].endswith("Choose one of: cheerful, calm, gloomy, tense.")


def check_word_arithmetic(example, background, shapes):
    forms = {
        r"has (\d+) \w+ and buys (\d+) more\.": lambda a, b: a + b,
        r"has (\d+) \w+ and gives (\d+) to \w+\.": lambda a, b: a - b,
        r"has (\d+) \w+ with (\d+) \w+ in each\.": lambda a, b: a * b,
        r"shares (\d+) \w+ equally among (\d+) friends\.": lambda a, b: a / b,
        r"has (\d+) \w+, buys (\d+) more and then gives (\d+) to \w+\.": lambda a, b, c: a + b - c,
        r"buys (\d+) \w+ of (\d+) \w+ and gives away (\d+) of them\.": lambda a, b, c: a * b - c,
    }
    matched = [(re.search(form, example["question"]), rule) for form, rule in forms.items()]
    matched = [(m, rule) for m, rule in matched if m]
    assert len(matched) == 1, example["question"]
    match, rule = matched[0]
    assert float(example["answer"]) == rule(*(int(g) for g in match.groups())) >= 0
    assert example["images"] == []


CHECKS = {
    "exists": check_exists,
    "count_choice": check_count_choice,
    "colors_present": check_colors_present,
    "count": check_count,
    "largest_attribute": check_largest_attribute,
    "count_arithmetic": check_count_arithmetic,
    "grounding": check_grounding,
    "mood": check_mood,
    "word_arithmetic": check_word_arithmetic,
}


@pytest.mark.parametrize("task", gym.TASKS)
def test_answers_match_the_pixels(examples, task):
    for example in by_task(examples, task):
        background, shapes = pixel_shapes(example["images"][0]) if example["images"] else (None, [])
        CHECKS[task](example, background, shapes)


def test_yes_no_and_mood_labels_are_balanced(examples):
    answers = [e["answer"] for e in by_task(examples, "exists")]
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.6
    moods = [e["answer"] for e in by_task(examples, "mood")]
    assert all(moods.count(label) >= PER_TASK // 4 - 1 for label in gym.MOOD_LABELS)
    largest = [e["question"] for e in by_task(examples, "largest_attribute")]
    assert 0 < sum("colour" in q for q in largest) < len(largest)


def test_mood_rule_cases():
    def scene(background, *shapes):
        placed = tuple(Shape(kind, color, "small", 6 + 12 * i, 10, 4) for i, (color, kind) in enumerate(shapes))
        return Scene(56, background, placed)

    warm_major = [("red", "square"), ("yellow", "circle"), ("blue", "circle")]
    cool_major = [("green", "square"), ("purple", "circle"), ("orange", "circle")]
    assert gym.scene_mood(scene("white", *warm_major)) == "cheerful"
    assert gym.scene_mood(scene("black", *warm_major)) == "tense"
    assert gym.scene_mood(scene("white", *cool_major)) == "calm"
    assert gym.scene_mood(scene("black", *cool_major)) == "gloomy"
    red_triangles = [("red", "triangle"), ("red", "triangle"), ("blue", "circle"), ("green", "square")]
    assert gym.scene_mood(scene("white", *red_triangles)) == "tense"
    assert gym.scene_mood(scene("white", ("red", "square"), ("blue", "circle"))) is None


def test_boxes_tightly_enclose_each_drawn_shape():
    for image_size in (56, 112):
        source = GymSource(
            "train", 60, GymConfig(image_size=image_size, difficulties=(2,)), tasks=("count", "grounding")
        )
        for i in range(len(source)):
            scene = source.spec(i).scene
            image = gym.render_scene(scene)
            assert np.array_equal(image, source[i]["images"][0])
            background, seen = pixel_shapes(image)
            assert background == scene.background
            by_box = {s["box"]: s for s in seen}
            assert len(by_box) == len(seen) == len(scene.shapes)
            for shape in scene.shapes:
                drawn = by_box[shape.bbox]  # KeyError: no drawn component has exactly this box
                assert (drawn["color"], drawn["kind"], drawn["area"]) == (shape.color, shape.kind, shape.area)
                x1, y1, x2, y2 = shape.bbox
                assert 1 <= x1 and x2 <= image_size - 1 and 1 <= y1 and y2 <= image_size - 1


def test_reasoning_ends_with_the_answer_and_caption_names_every_shape(train, examples):
    for index, example in enumerate(examples):
        last_sentence = re.split(r"(?<=[.?!])\s+", example["reasoning"].strip())[-1]
        assert example["answer"] in last_sentence, (example["id"], last_sentence)
        scene = train.spec(index).scene
        if scene is None:
            continue
        assert example["caption"].startswith(f"A 56x56 image on a {scene.background} background")
        for shape in scene.shapes:
            assert f"{shape.name} {shape.position(56)}" in example["caption"]
            assert shape.name in example["reasoning"]
        assert example["caption"].count(" a ") >= len(scene.shapes)


def test_corpus_texts_cover_all_tasks():
    texts = gym.corpus_texts(GymConfig(tasks=("count",)), num_examples=90)
    assert all(isinstance(t, str) and t for t in texts)
    joined = "\n".join(texts)
    for fragment in (
        "Is there a",
        "How many",
        "Select all that apply",
        "largest",
        "bounding box",
        "mood",
        "buys",
        "A 56x56 image",
        "The answer is",
        "cheerful",
    ):
        assert fragment in joined, fragment
    assert texts == gym.corpus_texts(GymConfig(tasks=("count",)), num_examples=90)


# ------------------------------------------------------------------------------------------ grain and tfds


def assert_same_example(got, want):
    assert got.keys() == want.keys()
    for field in want:
        if field == "images":
            assert len(got[field]) == len(want[field])
            for a, b in zip(got[field], want[field]):
                assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
        else:
            assert got[field] == want[field] and type(got[field]) is type(want[field]), field
            if isinstance(want[field], list):
                assert [type(v) for v in got[field]] == [type(v) for v in want[field]], field


def test_source_pickles_and_feeds_grain():
    source = GymSource("train", 18)
    clone = pickle.loads(pickle.dumps(source))
    assert repr(clone) == repr(source) and "split='train'" in repr(source)
    for i in range(len(source)):
        assert_same_example(clone[i], source[i])
    dataset = grain.MapDataset.source(source)
    assert len(dataset) == 18
    assert_same_example(dataset[0], source[0])
    assert [e["id"] for e in dataset.map(lambda e: e)][:2] == [source[0]["id"], source[1]["id"]]


def test_tfds_build_round_trips_to_the_gym(tmp_path):
    tfds_gym = pytest.importorskip("jaxvlm.data.tfds_gym")
    config = tfds_gym.JaxvlmGymConfig(name="tiny", train_size=12, validation_size=6, test_size=6)
    builder = tfds_gym.JaxvlmGym(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert builder.info.version == "1.0.0"
    written = sorted(p.name for p in (tmp_path / "jaxvlm_gym" / "tiny" / "1.0.0").glob("jaxvlm_gym-*"))
    assert written == [f"jaxvlm_gym-{split}.array_record-00000-of-00001" for split in ("test", "train", "validation")]
    for split, size in (("train", 12), ("validation", 6), ("test", 6)):
        loaded = tfds_gym.load_gym_split(str(tmp_path), split, config, prepare=False)
        expected = GymSource(split, size, config.gym_config())
        assert len(loaded) == size
        for i in range(size):
            assert_same_example(loaded[i], expected[i])
    dataset = grain.MapDataset.source(pickle.loads(pickle.dumps(loaded)))
    assert_same_example(dataset[5], expected[5])
    assert tfds_gym.JaxvlmGym(config="default", data_dir=str(tmp_path)).builder_config.image_size == 56


def test_tfds_source_from_config_entry_names_builds_by_content(tmp_path):
    tfds_gym = pytest.importorskip("jaxvlm.data.tfds_gym")
    entry = dict(tasks=["count", "mood"], shape_counts=[[1, 2], [2, 3], [3, 4]], seed=2)
    loaded = tfds_gym.gym_data_source(str(tmp_path), "validation", {"train": 4, "validation": 5, "test": 3}, **entry)
    expected = GymSource("validation", 5, GymConfig(**entry))
    assert len(loaded) == 5
    for i in range(5):
        assert_same_example(loaded[i], expected[i])
    bigger = tfds_gym.gym_data_source(str(tmp_path), "test", {"train": 4, "validation": 5, "test": 4}, **entry)
    assert len(bigger) == 4
    builds = sorted(p.name for p in (tmp_path / "jaxvlm_gym").iterdir() if not p.name.startswith("."))
    assert len(builds) == 2 and all(name.startswith("custom_") for name in builds)
