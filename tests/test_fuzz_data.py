"""Fuzzing the data path: seeded generators of good and hostile JSONL records (wrong types in every field, deep
nesting, huge numbers, NaN / Infinity, lone surrogates, special tokens, control characters, invalid UTF-8, long
lines, and broken, huge, zero-sized, 16-bit and non-image files) read by `JsonlSource` and encoded by the pipeline's
`ExampleEncoder` with a tiny tokenizer.

Every record must either encode or raise `DataError` of the kind its generator expects, with a message that starts
with its file:line (and names the field where one is at fault) -- never any other exception. The skip-mode pipeline
over the same file must hand out exactly the records that encoded and count exactly the ones that did not, by kind.

`JAXVLM_FULL_TESTS=1` runs 1,000 records per surface (jaxvlm records, r1v records); the default is a CI-sized
sample. `python -m pytest -s tests/test_fuzz_data.py` prints the per-surface tally and the slowest record.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import time

import numpy as np
import pytest
from PIL import Image

from jaxvlm.data import jsonl, pipeline
from jaxvlm.data.jsonl import DataError, JsonlSource
from test_data_hostile import (
    encoder_for,
    image_bytes,
    noise_rgb,
    png_header_only,
    png_with_bad_chunk_length,
    sixteen_bit_grey,
    skip_pipeline,
    skip_totals,
)

FULL = os.environ.get("JAXVLM_FULL_TESTS") == "1"
N = 1000 if FULL else 80  # records per surface
SEED = 18
MAX_CPU_SECONDS_PER_RECORD = 20.0  # generous: the slowest record takes well under a second
RECORD_BYTES_LIMIT = 64 << 10  # MAX_RECORD_BYTES during the fuzz, so over-long lines are cheap to make
ENCODER = dict(prompt_style="r1", with_targets=True, max_prompt_length=512, max_target_length=256)
ENCODER_R1V = dict(ENCODER, prompt_style="plain")  # R1-V records have no reference reasoning

OK = "ok"


@dataclasses.dataclass
class Case:
    """One generated line: its raw text, what must happen to it, and what the error must mention."""

    line: bytes
    expect: str  # OK, or the DataError kind
    needle: str = ""
    label: str = ""


# ----------------------------------------------------------------------------------------------------------
# Image files
# ----------------------------------------------------------------------------------------------------------


def make_images(root) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(good image names, [(bad image name, kind, needle)]) written under `root`."""
    rgb = noise_rgb(7, 56)
    good = {
        "rgb.png": rgb,
        "l.png": rgb.convert("L"),
        "p.png": rgb.convert("P"),
        "rgba.png": rgb.convert("RGBA"),
        "la.png": rgb.convert("LA"),
        "one.png": rgb.convert("1"),
        "g16.png": sixteen_bit_grey(np.random.default_rng(1).integers(0, 65536, (40, 30))),
        "cmyk.jpg": rgb.convert("CMYK"),
        "rgb.jpg": rgb,
        "rgb.gif": rgb,
        "rgb.bmp": rgb,
        "rgb.webp": rgb,
        "i32.tiff": Image.fromarray(np.random.default_rng(2).integers(0, 65536, (20, 20)).astype(np.int32)),
        "tiny.png": noise_rgb(8, 1),
    }
    for name, image in good.items():
        image.save(os.path.join(root, name))
    bad = {
        "truncated.png": (image_bytes(rgb)[:300], "bad_image", "cannot decode image"),
        "badchunk.png": (png_with_bad_chunk_length(), "bad_image", "SyntaxError"),
        "empty.png": (b"", "bad_image", "cannot identify image"),
        "text.png": (b"hello, I am not a picture", "bad_image", "cannot identify image"),
        "eps.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", "bad_image", "cannot identify image"),
        "zero.png": (png_header_only(0, 7), "bad_image", "cannot identify image"),
        "bomb.png": (png_header_only(20_000, 20_000), "bad_image", "data.max_image_pixels"),
        "big.png": (png_header_only(9_000, 9_000), "bad_image", "data.max_image_pixels"),
        "float.tiff": (image_bytes(Image.new("F", (8, 8), 0.5), "TIFF"), "bad_image", "mode 'F'"),
        "tall.png": (image_bytes(noise_rgb(9, 1).resize((1, 300))), "bad_image", "aspect ratio"),
    }
    for name, (data, _, _) in bad.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "a_directory.png"), exist_ok=True)
    bad_list = [(name, kind, needle) for name, (_, kind, needle) in bad.items()]
    bad_list += [
        ("missing.png", "missing_image", "not found"),
        ("a_directory.png", "missing_image", "not found"),
        ("nul\x00byte.png", "missing_image", "not found"),
        ("lone\ud800.png", "missing_image", "not found"),
    ]
    return list(good), bad_list


# ----------------------------------------------------------------------------------------------------------
# Record generators
# ----------------------------------------------------------------------------------------------------------

WORDS = ["circle", "red", "Wie viele", "ÖÄÜ", "三角形", "🙂", "مرحبا", "e\u0301", "x²", "∑", "tab\there", "a'b\"c"]
CONTROL = "\x00\x01\x07\x1b[2J\u202e\u200b\ufeff\x7f"


def sentence(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "?"


def valid_answer(rng: random.Random) -> dict:
    """A random answer_type with a valid answer (and the options / bbox it needs)."""
    kind = rng.choice(["yesno", "choice", "multi_choice", "number", "math", "string", "bbox", "labels"])
    if kind == "yesno":
        return {"answer_type": kind, "answer": rng.choice(["yes", "No.", " YES "])}
    if kind == "choice":
        return {"answer_type": kind, "answer": rng.choice("ABC"), "options": ["one", "two", "three"]}
    if kind == "multi_choice":
        return {"answer_type": kind, "answer": rng.choice(["A,C", "b, a", "D"]), "options": ["w", "x", "y", "z"]}
    if kind == "number":
        return {"answer_type": kind, "answer": rng.choice(["3", "-2.5", 7, 2.5, "1,000", 0])}
    if kind == "math":
        return {"answer_type": kind, "answer": rng.choice(["\\frac{1}{2}", "x^2", "3"])}
    if kind == "bbox":
        return {"answer_type": kind, "answer": "[1, 2, 30, 40]", "bbox": rng.choice([[], [1, 2, 30, 40.5]])}
    if kind == "labels":
        return {"answer_type": kind, "answer": rng.choice(["calm", "calm, warm", "tense，gloomy"])}
    return {"answer_type": kind, "answer": sentence(rng, 2)}


def good_record(rng: random.Random, k: int, good_images: list[str]) -> dict:
    record = {"id": f"r{k}", "question": sentence(rng), "reasoning": sentence(rng, 3), **valid_answer(rng)}
    if rng.random() < 0.5:
        record["caption"] = sentence(rng, 4)
    if rng.random() < 0.4:
        record["difficulty"] = rng.randrange(0, 3)
    if rng.random() < 0.3:
        record["task"] = rng.choice(["count", "grounding", ""])
    if rng.random() < 0.3:
        record["question"] += rng.choice([" Use <think> tags.", CONTROL, " 1 < 2 > 0 <|notatoken|>"])
    images = rng.sample(good_images, rng.randrange(0, 3))
    if len(images) == 1 and rng.random() < 0.5:
        record["image"] = images[0]  # the alias
    elif images:
        record["images"] = images
    if rng.random() < 0.2:
        record["hint"] = record.pop("reasoning")  # DyME's name
    return record


def dumps(record) -> bytes:
    """One JSON line; a record with lone surrogates is written with \\ud800 escapes, as real files have them."""
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record).encode("ascii")


def canonical(record: dict) -> dict:
    """`record` with the aliases `image` / `hint` renamed to `images` / `reasoning`."""
    out = {("images" if k == "image" else "reasoning" if k == "hint" else k): v for k, v in record.items()}
    if isinstance(out.get("images"), str):
        out["images"] = [out["images"]]
    return out


WRONG_TYPES = {
    "question": [5, 3.5, True, [], {}, ["q"], None, "", "   "],
    "answer": [True, False, [], {}, ["1"], None, "", {"a": [1]}],
    "answer_type": [5, "nope", "", True, ["number"]],
    "task": [5, 2.5, True, [], {"a": 1}],
    "reasoning": [5, 2.5, False, ["r"], {}],
    "caption": [7, 0.5, True, [""], {"c": "d"}],
    "target": [1, -1.5, True, ["t"]],
    "id": [3, 1.5, True, ["i"], {}],
    "difficulty": ["1", -1, 1.5, True, [], {}, [1]],
    "bbox": [5, True, 3.5, "abc", [1, 2, 3], [1, 2, 3, 4, 5], [True, 1, 2, 3], ["1", "2", "3", "4"], [4, 3, 2, 1]]
    + [[[1], [2], [3], [4]], {"x": 1}, [1, 2, None, 4], "[1, 2, 3]"],
    "options": ["A", 5, [1, 2], [[]], ["a"] * 11, {"a": 1}, [None], True],
    "images": [5, True, [5], [""], {}, [["rgb.png"]], 3.5, [None]],
}
TEXT_FIELDS = ["question", "reasoning", "caption", "answer", "target", "options"]


def wrong_type_case(rng: random.Random, base: dict) -> Case:
    field = rng.choice(sorted(WRONG_TYPES))
    value = rng.choice(WRONG_TYPES[field])
    record = canonical(base)
    record[field] = value
    if field == "answer_type" or field == "answer":
        record.pop("options", None)
        record.pop("bbox", None)
    if field == "options":
        record["answer_type"], record["answer"] = "string", "x"
    return Case(dumps(record), "field", f"field '{field}", f"wrong type {field}={value!r:.30}")


def insert(rng: random.Random, text: str, piece: str) -> str:
    at = rng.randrange(len(text) + 1)
    return text[:at] + piece + text[at:]


def text_attack_case(rng: random.Random, base: dict, specials: tuple[str, ...]) -> Case:
    field = rng.choice(TEXT_FIELDS)
    record = {k: v for k, v in canonical(base).items() if k != "bbox"}
    record.setdefault("reasoning", "r")
    record["answer_type"], record["answer"] = "string", "an answer"
    record.pop("options", None)
    if field == "options":
        record["options"] = ["first", "second"]
    attack = rng.choice(["surrogate", "special", "control", "long"])
    named = f"options[{1}]" if field == "options" else field

    def apply(piece):
        if field == "options":
            record["options"][1] = insert(rng, record["options"][1], piece)
        else:
            record[field] = insert(rng, record.get(field) or "text", piece)

    if attack == "surrogate":
        apply(rng.choice(["\ud800", "\udfff", "\udc80x"]))
        return Case(dumps(record), "field", f"field '{named}': contains a lone surrogate", "lone surrogate in " + field)
    if attack == "special":
        apply(rng.choice(specials))
        return Case(dumps(record), "field", f"field '{named}': contains the special token", "special token in " + field)
    if attack == "control":
        apply(CONTROL)
        return Case(dumps(record), OK, "", "control characters in " + field)
    apply("many words " * 4000)  # ~44 KB of text: under the line limit, over every token limit
    # The prompt holds the question; the target the reasoning and answer (or the verbatim target). The caption is
    # not in the prompt here (with_caption=False) and options are scored, never tokenized.
    used = {"question", "reasoning", "answer", "target"}
    if field not in used or (field in ("reasoning", "answer") and record.get("target")):
        return Case(dumps(record), OK, "", "long unused " + field)
    return Case(dumps(record), "too_long", "tokens", "long " + field)


def json_attack_case(rng: random.Random, base: dict) -> Case:
    record = canonical(base)
    text = json.dumps(record, ensure_ascii=False)
    field = rng.choice(["answer", "difficulty", "bbox", "question", "task"])
    attack = rng.choice(
        ["constant", "big_float", "huge_int", "deep", "depth17", "duplicate", "truncated", "not_object", "bad_utf8"]
        + ["unknown_key", "both_image_keys", "bom_inside", "trailing", "over_long"]
    )

    def with_raw(raw: str) -> bytes:
        """`record` with `field` set to the raw JSON text `raw`."""
        rest = {k: v for k, v in record.items() if k != field}
        body = json.dumps(rest, ensure_ascii=False)[1:-1]
        return ("{" + (body + ", " if body else "") + json.dumps(field) + ": " + raw + "}").encode()

    if attack == "constant":
        literal = rng.choice(["NaN", "Infinity", "-Infinity"])
        return Case(with_raw(literal), "parse", "not a JSON number", f"{literal} in {field}")
    if attack == "big_float":
        return Case(with_raw(rng.choice(["1e999", "-1e400", "[1, 2, 3e500, 4]"])), "parse", "range of a float", "1e999")
    if attack == "huge_int":
        digits = rng.choice([4301, 6000])
        return Case(with_raw("9" * digits), "parse", "4300 digits", f"{digits}-digit int in {field}")
    if attack == "deep":
        depth = rng.choice([20, 1500, 30_000])  # 30,000: 60 KB, under the fuzz's line limit
        needle = "nested too deeply" if depth > 1000 else f"nests {depth + 1} levels deep"
        return Case(with_raw("[" * depth + "]" * depth), "parse", needle, f"nesting {depth}")
    if attack == "depth17":
        return Case(with_raw("[" * 16 + "1" + "]" * 16), "parse", "nests 17 levels deep", "nesting 17")
    if attack == "duplicate":
        return Case(text[:-1].encode() + b', "question": "again"}', "parse", "appears twice", "duplicate key")
    if attack == "truncated":
        return Case(text[: rng.randrange(1, len(text) - 1)].encode(), "parse", "not valid JSON", "truncated")
    if attack == "not_object":
        value = rng.choice(["[1, 2]", '"a string"', "5", "null", "true", "[]"])
        return Case(value.encode(), "parse", "must be a JSON object", "top level " + value)
    if attack == "bad_utf8":
        raw = text.encode()
        at = rng.randrange(len(raw) + 1)
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
        return Case(raw[:at] + bad + raw[at:], "parse", "not UTF-8", "invalid UTF-8")
    if attack == "unknown_key":
        return Case(dumps({**record, "colour": "red"}), "field", "field 'colour': unknown", "unknown key")
    if attack == "both_image_keys":
        both = {**record, "image": "rgb.png", "images": ["rgb.png"]}
        return Case(dumps(both), "field", "field 'images' given twice", "image and images")
    if attack == "bom_inside":
        return Case(b"\xef\xbb\xbf" + text.encode(), "parse", "BOM", "BOM after line 1")
    if attack == "trailing":
        return Case(text.encode() + rng.choice([b" x", b"}", b" {}", b","]), "parse", "not valid JSON", "trailing")
    padded = {**record, "task": "t" * (RECORD_BYTES_LIMIT + 10)}
    return Case(dumps(padded), "too_long", f"over {RECORD_BYTES_LIMIT} bytes", "over-long line")


def image_case(rng: random.Random, base: dict, good_images: list[str], bad_images: list) -> Case:
    record = {k: v for k, v in canonical(base).items() if k != "images"}
    name, kind, needle = rng.choice(bad_images)
    images = [*rng.sample(good_images, rng.randrange(0, 2)), name]
    rng.shuffle(images)
    record["images"] = images
    if rng.random() < 0.3 and len(images) == 1:
        record["image"] = record.pop("images")[0]
    return Case(dumps(record), kind, needle, "image " + name)


def generate_jaxvlm_cases(n: int, seed: int, good_images: list[str], bad_images: list, specials) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        base = good_record(rng, k, good_images)
        roll = rng.random() if k else 0.0  # line 1 is good: a byte-order mark there is allowed, not an error
        if roll < 0.3:
            cases.append(Case(dumps(base), OK, "", "good"))
        elif roll < 0.5:
            cases.append(wrong_type_case(rng, base))
        elif roll < 0.65:
            cases.append(text_attack_case(rng, base, specials))
        elif roll < 0.85:
            cases.append(json_attack_case(rng, base))
        else:
            cases.append(image_case(rng, base, good_images, bad_images))
    return cases


def generate_r1v_cases(n: int, seed: int, good_images: list[str]) -> list[Case]:
    """R1-V / Curr-ReFT records (`{"image", "problem", "solution": "<answer>3</answer>"}`, answer_type number)."""
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        record = {"image": rng.choice(good_images), "problem": sentence(rng), "id": f"v{k}"}
        record["solution"] = f"<think>{sentence(rng, 2)}</think><answer> {rng.randrange(10)} </answer>"
        if rng.random() < 0.3:
            record["problem_type"] = rng.choice(["counting", 5])
        if rng.random() < 0.3:
            record["conversations"] = [{"from": "human", "value": "hi"}]
        roll = rng.random()
        if roll < 0.35:
            cases.append(Case(dumps(record), OK, "", "good"))
            continue
        attack = rng.choice(["solution", "problem", "problem_type", "conversations", "no_tags", "surrogate"])
        if attack == "solution":
            record["solution"] = rng.choice([[1], {"a": 1}, True, None, "<answer>many</answer>", "<answer></answer>"])
            cases.append(Case(dumps(record), "field", "field 'answer'", "solution"))
        elif attack == "problem":
            record["problem"] = rng.choice([5, [], None, {"q": 1}, ""])
            cases.append(Case(dumps(record), "field", "field 'question'", "problem"))
        elif attack == "problem_type":
            record["problem_type"] = rng.choice([[], {}, True, 2.5])
            cases.append(Case(dumps(record), "field", "field 'problem_type'", "problem_type"))
        elif attack == "conversations":
            record["conversations"] = json.loads("[" * 30 + "]" * 30)
            cases.append(Case(dumps(record), "parse", "levels deep", "deep ignored key"))
        elif attack == "no_tags":
            record["solution"] = str(rng.randrange(10))  # no tags: the whole text is the answer
            cases.append(Case(dumps(record), OK, "", "untagged solution"))
        else:
            record["problem"] = "x\udfffy"
            cases.append(Case(dumps(record), "field", "field 'question': contains a lone surrogate", "surrogate"))
    return cases


# ----------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------


def write_cases(path, cases: list[Case]) -> None:
    with open(path, "wb") as f:
        f.write(b"\n".join(case.line.replace(b"\n", b" ") for case in cases) + b"\n")


def run_cases(source: JsonlSource, encoder, cases: list[Case]) -> dict:
    """Read + encode every record; assert each outcome; return the tally (outcomes, kinds, slowest record)."""
    assert len(source) == len(cases)
    outcomes, kinds, slowest, crashes = collections.Counter(), collections.Counter(), (0.0, 0.0, ""), []
    good_ids = []
    for index, case in enumerate(cases):
        cpu, wall = time.process_time(), time.perf_counter()
        error = None
        try:
            encoded = encoder.encode(source[index])
        except DataError as raised:
            error = raised
        except Exception as raised:  # a crash: what this suite exists to find
            crashes.append(f"line {index + 1} ({case.label}): {type(raised).__name__}: {str(raised)[:200]}")
            continue
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        slowest = max(slowest, (cpu, wall, case.label))
        where = f"{source.path}:{source.line_number(index)}"
        if error is None:
            outcomes[OK] += 1
            good_ids.append(encoded["meta"]["id"])
            assert case.expect == OK, f"{where} ({case.label}) encoded, expected DataError {case.expect}"
        else:
            outcomes["DataError"] += 1
            kinds[error.kind] += 1
            message = str(error)
            assert case.expect != OK, f"{where} ({case.label}) expected to encode: {message[:300]}"
            assert message.startswith((where + ": ", where + " [")), message[:300]  # "file:line [id]: ..."
            assert error.kind == case.expect, f"{where} ({case.label}): {error.kind} != {case.expect}: {message[:300]}"
            assert case.needle in message, f"{where} ({case.label}): {case.needle!r} not in {message[:300]}"
    assert crashes == [], "\n".join(crashes)
    return {"outcomes": outcomes, "kinds": kinds, "slowest": slowest, "good_ids": good_ids}


def check_skip_mode(source: JsonlSource, tally: dict, tokenizer, model_config, encoder: dict) -> None:
    """The skip-mode pipeline hands out exactly the records that encoded and counts exactly the others, by kind."""
    expected = {kind: tally["kinds"].get(kind, 0) for kind in pipeline.SKIP_KINDS}
    in_order = list(
        skip_pipeline([source], tokenizer, model_config, **encoder, shuffle=False, drop_remainder=False, batch_size=4)
    )
    assert [ex["id"] for b in in_order for ex in b["examples"]] == tally["good_ids"]
    assert skip_totals(in_order) == expected
    shuffled = list(
        skip_pipeline([source], tokenizer, model_config, **encoder, seed=3, batch_size=3, num_threads=2, prefetch=2)
    )
    ids = [ex["id"] for b in shuffled for ex in b["examples"]]
    assert len(ids) == len(set(ids)) and set(ids) <= set(tally["good_ids"])
    assert len(ids) == len(tally["good_ids"]) // 3 * 3  # drop_remainder: only whole batches
    assert skip_totals(shuffled) == expected


def report(surface: str, tally: dict, n: int) -> None:
    cpu, wall, label = tally["slowest"]
    print(
        f"\nfuzz {surface}: {n} records, encoded {tally['outcomes'][OK]}, DataError {tally['outcomes']['DataError']} "
        f"{dict(sorted(tally['kinds'].items()))}, crashes 0, slowest record {wall:.3f} s wall / {cpu:.3f} s CPU "
        f"({label})"
    )
    assert cpu < MAX_CPU_SECONDS_PER_RECORD, f"{label} took {cpu:.1f} s of CPU"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_images")
    good, bad = make_images(str(root))
    return root, good, bad


def test_fuzz_jaxvlm_records(images, tokenizer, model_config, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_RECORD_BYTES", RECORD_BYTES_LIMIT)
    root, good, bad = images
    cases = generate_jaxvlm_cases(N, SEED, good, bad, pipeline.special_tokens(tokenizer))
    path = root / "fuzz.jsonl"
    write_cases(path, cases)
    source = JsonlSource(path, answer_type="string")
    tally = run_cases(source, encoder_for(tokenizer, **ENCODER), cases)
    expect = collections.Counter(case.expect for case in cases)
    assert tally["outcomes"][OK] >= expect[OK] and min(tally["outcomes"].values()) > 0
    check_skip_mode(source, tally, tokenizer, model_config, ENCODER)
    report("jaxvlm records", tally, N)


def test_fuzz_r1v_records(images, tokenizer, model_config):
    root, good, _ = images
    cases = generate_r1v_cases(N, SEED + 1, good)
    path = root / "fuzz_r1v.jsonl"
    write_cases(path, cases)
    source = JsonlSource(path, record_format="r1v", answer_type="number")
    tally = run_cases(source, encoder_for(tokenizer, **ENCODER_R1V), cases)
    assert min(tally["outcomes"].values()) > 0
    check_skip_mode(source, tally, tokenizer, model_config, ENCODER_R1V)
    report("r1v records", tally, N)


def test_the_generators_cover_every_attack_and_are_seeded(images, tokenizer):
    """The fuzz is only as good as its mix: every kind of failure appears in a full-size draw, and the same seed
    gives the same records."""
    _, good, bad = images
    specials = pipeline.special_tokens(tokenizer)
    draw = generate_jaxvlm_cases(1000, SEED, good, bad, specials)
    assert [c.line for c in draw[:50]] == [c.line for c in generate_jaxvlm_cases(50, SEED, good, bad, specials)]
    expects = collections.Counter(case.expect for case in draw)
    assert set(expects) >= {OK, "parse", "field", "missing_image", "bad_image", "too_long"}
    labels = " ".join(case.label for case in draw)
    for needle in ("NaN", "Infinity", "digit", "nesting", "lone surrogate", "special token", "control characters"):
        assert needle in labels, needle
    for name, _, _ in bad:
        assert f"image {name}" in labels, name
