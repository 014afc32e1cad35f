"""Tests of jaxvlm.rewards: extraction, format and accuracy rewards, the Curr-ReFT stage-3 bug cases, the combiner."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxvlm import rewards as R

# Captured before any test registers its own; the text rewards (soft_overlong scores token counts, in [-1, 0]:
# tests/test_overlong_reward.py).
BUILTIN_REWARDS = tuple(name for name in R.REWARDS if not R.takes_kwarg(name, R.LENGTH_KWARG))


def test_math_verify_is_installed_as_a_dependency():
    # math-verify is in setup.py's install_requires, so both math paths below always run (never skipped).
    assert R.math_verify_available()


CURR_REFT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"


def make_example(answer_type="string", answer="red", **fields):
    return {
        "id": f"test/{answer_type}",
        "question": "q?",
        "answer": answer,
        "answer_type": answer_type,
        "task": "",
        "reasoning": "",
        "bbox": [],
        "options": [],
        **fields,
    }


@pytest.fixture
def temp_reward():
    """Register test rewards under fresh names; removed afterwards."""
    added = []

    def add(name, fn, **options):
        R.register(name, **options)(fn)
        added.append(name)
        return name

    yield add
    for name in added:
        R.REWARDS.pop(name, None)
        R.STARTUP_CHECKS.pop(name, None)
        R._warned.discard(name)


# ---------------------------------------------------------------------------------------------------------------
# Extraction


def test_extract_answer_tags():
    assert R.extract_answer("<think>x</think><answer> B </answer>", "tags") == "B"
    assert R.extract_answer("<answer></answer>", "tags") == ""
    assert R.extract_answer("no tags at all", "tags") is None
    assert R.extract_answer("<answer>B", "tags") is None  # unclosed
    assert R.extract_answer("</answer>B<answer>", "tags") is None  # wrong order
    assert R.extract_answer("<answer>1</answer><answer>2</answer>", "tags") is None  # ambiguous


def test_extract_answer_dyme_and_raw():
    assert R.extract_answer("think... Answer: 42", "dyme") == "42"
    assert R.extract_answer("answer: 1 then ANSWER:  7 \nmore text", "dyme") == "7"  # last flag, first line
    assert R.extract_answer("reasoning\nAnswer:\n\n  **Red.**  \nextra", "dyme") == "Red."
    assert R.extract_answer("no flag here 42", "dyme") is None
    assert R.extract_answer("  whole thing \n", "raw") == "whole thing"
    with pytest.raises(ValueError, match="extraction style"):
        R.extract_answer("x", "xml")


def test_dyme_thinking():
    assert R.dyme_thinking("Step one. Step two.\nAnswer: 3. Answer: 4") == "Step one. Step two."
    assert R.dyme_thinking("ANSWER: 3") == ""
    assert R.dyme_thinking("only thinking") == "only thinking"


# ---------------------------------------------------------------------------------------------------------------
# Format rewards


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reason</think><answer>yes</answer>", 1.0),
        ("  \n<think>reason</think> \n\t <answer>yes</answer>\n ", 1.0),  # whitespace around and between
        ("<think>multi\nline</think>\n<answer>a\nb</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>yes</answer>", 0.0),  # no think
        ("<think>reason</think>", 0.0),  # no answer
        ("<think>reason</think> yes", 0.0),
        ("<think>reason</think>text<answer>yes</answer>", 0.0),  # text between the blocks
        ("<think>reason</think><answer>yes</answer> trailing", 0.0),
        ("<answer>yes</answer><think>reason</think>", 0.0),  # wrong order
        ("<think>a<think>b</think></think><answer>y</answer>", 0.0),  # nested think
        ("<think>reason</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>a</think><think>b</think><answer>y</answer>", 0.0),
        ("<think>a</think><answer><answer>y</answer></answer>", 0.0),
    ],
)
def test_format_think_answer(completion, expected):
    assert R.format_think_answer(completion, {}) == expected


def test_format_think_answer_is_stricter_than_curr_reft_regex():
    two_answers = "<think>r</think><answer>1</answer><answer>2</answer>"
    # Curr-ReFT's own regex accepts two answer blocks (the lazy .*? extends over "</answer><answer>") ...
    assert re.fullmatch(CURR_REFT_FORMAT, two_answers, re.DOTALL)
    # ... we do not reward several answers.
    assert R.format_think_answer(two_answers) == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>r</think><answer>[10, 20, 30, 40]</answer>", 1.0),
        ('<think>r</think><answer>{"bbox_2d": [10,20,30,40], "label": "dog"}</answer>', 1.0),
        ("<think>r</think><answer>[10.5, 20, 30.25, 40]</answer>", 1.0),
        ("<think>r</think><answer>[10, 20, 30]</answer>", 0.0),
        ("<think>r</think><answer>[10, 20, 30, 40, 50]</answer>", 0.0),
        ("<think>r</think><answer>[1, 2, 3, 4] [5, 6, 7, 8]</answer>", 0.0),
        ("<think>r</think><answer>the dog</answer>", 0.0),
        ("<think>[1, 2, 3, 4]</think><answer>dog</answer>", 0.0),  # the box must be in the answer
        ("<answer>[10, 20, 30, 40]</answer>", 0.0),  # think still required
    ],
)
def test_format_think_answer_bbox(completion, expected):
    assert R.format_think_answer_bbox(completion, {}) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("I think so.\nAnswer: 3", 1.0),
        ("reasoning ANSWER: 3", 1.0),
        ("reasoning aNsWeR:3", 1.0),
        ("reasoning, the answer is 3", 0.0),
        ("Answer: 3\nAnswer: 4", 0.0),
        ("answer: 3 and Answer: 4", 0.0),
        ("**Answer**: 3", 0.0),
    ],
)
def test_format_dyme(completion, expected):
    assert R.format_dyme(completion, {}) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>x</answer>", 1.0),
        ("blah <answer>x</answer> blah", 1.0),
        ("<think>t</think><answer>x</answer>", 1.0),
        ("<answer>x", 0.0),
        ("x</answer>", 0.0),
        ("<answer>x</answer><answer>y</answer>", 0.0),
        ("no tags", 0.0),
    ],
)
def test_format_answer_tag(completion, expected):
    assert R.format_answer_tag(completion, {}) == expected


# ---------------------------------------------------------------------------------------------------------------
# Yes / no


@pytest.mark.parametrize(
    "pred, label",
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("True.", "yes"),
        ("correct", "yes"),
        ("That is correct!", "yes"),
        ("no", "no"),
        ("No.", "no"),
        ("FALSE", "no"),
        ("incorrect", "no"),
        ("The claim is incorrect.", "no"),
        ("yes and no", None),
        ("True, it is false", None),
        ("nothing", None),
        ("I know", None),
        ("eyes", None),
        ("yesterday", None),
        ("notable", None),
        ("", None),
    ],
)
def test_yesno_label(pred, label):
    assert R.yesno_label(pred) == label


def test_yesno_departures_from_curr_reft_regex():
    # Curr-ReFT's unbounded no-regex finds "no" inside "nothing"; ours does not.
    assert re.search(r"(no|false|incorrect)", "nothing")
    assert R.yesno_score("nothing", "no") == 0.0
    # Curr-ReFT's yes-regex has the lookbehind that keeps "incorrect" from reading as "correct".
    assert not re.search(r"(?<![a-z])(yes|true|correct)(?![a-z])", "incorrect")
    assert R.yesno_score("incorrect", "no") == 1.0
    assert R.yesno_score("incorrect", "yes") == 0.0


def test_yesno_score():
    assert R.yesno_score("Yes, there is a cat.", "yes") == 1.0
    assert R.yesno_score("True.", "yes") == 1.0
    assert R.yesno_score("yes", "no") == 0.0
    assert R.yesno_score("yes and no", "yes") == 0.0
    assert R.yesno_score("maybe", "no") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Choice


@pytest.mark.parametrize(
    "text, letters",
    [
        ("B", ["B"]),
        ("(B)", ["B"]),
        ("B.", ["B"]),
        ("A, C", ["A", "C"]),
        ("C,A,C", ["C", "A"]),
        ("Answer: B", ["B"]),
        ("a dog", []),
        ("Apple", []),
        ("b", ["B"]),
        ("(c).", ["C"]),
        ("K", []),
        ("A1", []),
        ("", []),
    ],
)
def test_choice_letters(text, letters):
    assert R.choice_letters(text) == letters


def test_choice_score():
    assert R.choice_score("B", "B") == 1.0
    assert R.choice_score("C", "B") == 0.0
    assert R.choice_score("A, C", "A,C") == 1.0
    assert R.choice_score("C, A", "A,C") == 1.0  # order-insensitive
    assert R.choice_score("A, C, A, C", "A,C") == 1.0  # duplicates
    assert R.choice_score("A", "A,C") == 0.0  # no partial credit by default (released stage 2)
    assert R.choice_score("A", "A,C", partial_credit=0.2) == pytest.approx(0.2)
    assert R.choice_score("A, B", "A,C", partial_credit=0.2) == pytest.approx(0.2)
    assert R.choice_score("A, B, C", "A,C", partial_credit=0.2) == pytest.approx(0.2)
    assert R.choice_score("B, D", "A,C", partial_credit=0.2) == 0.0  # no overlap
    assert R.choice_score("", "A", partial_credit=0.2) == 0.0
    assert R.choice_score("none of them", "A", partial_credit=0.2) == 0.0


def test_choice_via_accuracy_raw_answer_prefix():
    example = make_example("choice", "B")
    assert R.accuracy("Answer: B", example, extract="raw") == 1.0  # the A of "Answer" does not count
    assert R.accuracy("Answer: C", example, extract="raw") == 0.0
    assert R.accuracy("<think>x</think><answer>(B)</answer>", example) == 1.0
    assert R.accuracy("reasoning\nAnswer: b", example, extract="dyme") == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Numbers


def test_parse_single_number():
    assert R.parse_single_number("5") == 5.0
    assert R.parse_single_number(" -2.5. ") == -2.5
    assert R.parse_single_number("1,234,567") == 1234567.0
    assert R.parse_single_number("There are 5 apples") == 5.0
    assert R.parse_single_number("5 or 5") == 5.0
    for hedge in ("3 or 4", "3-4", "12,5", "3, 4", "", "none", "x2"):
        assert R.parse_single_number(hedge) is None, hedge


def test_number_score():
    assert R.number_score("3", "3") == 1.0
    assert R.number_score("3.0", "3") == 1.0
    assert R.number_score("1,000", "1000") == 1.0
    assert R.number_score("3.01", "3") == 0.0  # tolerance 0 = exact (DyME training)
    assert R.number_score("3.1", "3", rel_tol=0.05) == 1.0  # ChartQA-style relaxed evaluation
    assert R.number_score("3.2", "3", rel_tol=0.05) == 0.0
    assert R.number_score("3.4", "3", abs_tol=0.5) == 1.0
    assert R.number_score("3 or 4", "3") == 0.0
    assert R.number_score("", "3") == 0.0
    assert R.number_score("-3", "3") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Math, including Curr-ReFT's stage-3 reward bug (docs/methods.md §3.6, Curr-ReFT bug 1)


@pytest.mark.parametrize("use_math_verify", [True, False])
def test_curr_reft_stage3_bug_cases_score_zero(use_math_verify):
    example = make_example("math", "5")
    assert R.accuracy("<think>r</think><answer>7</answer>", example, use_math_verify=use_math_verify) == 0.0
    assert R.math_score("7", "5", use_math_verify=use_math_verify) == 0.0
    assert R.math_score("1", "12", use_math_verify=use_math_verify) == 0.0  # substring of the reference
    assert R.math_score("12", "1", use_math_verify=use_math_verify) == 0.0
    assert R.math_score("", "5", use_math_verify=use_math_verify) == 0.0
    assert R.math_score("   ", "5", use_math_verify=use_math_verify) == 0.0
    assert R.math_score("3 or 5", "5", use_math_verify=use_math_verify) == 0.0
    assert R.accuracy("<think>r</think><answer></answer>", example, use_math_verify=use_math_verify) == 0.0
    assert R.accuracy("<think>r</think><answer>5</answer>", example, use_math_verify=use_math_verify) == 1.0


@pytest.mark.parametrize("use_math_verify", [True, False])
def test_math_correct_answers(use_math_verify):
    kw = dict(use_math_verify=use_math_verify)
    assert R.math_score("5", "5", **kw) == 1.0
    assert R.math_score("\\boxed{5}", "5", **kw) == 1.0
    assert R.math_score("$5$", "5", **kw) == 1.0
    assert R.math_score("0.5", "\\frac{1}{2}", **kw) == 1.0
    assert R.math_score("\\frac{1}{2}", "0.5", **kw) == 1.0
    assert R.math_score("1/2", "\\frac{1}{2}", **kw) == 1.0
    assert R.math_score("-0.5", "\\frac{1}{2}", **kw) == 0.0
    assert R.math_score("A", "A", **kw) == 1.0  # a letter reference is matched exactly ...
    assert R.math_score("B", "A", **kw) == 0.0


def test_math_verify_symbolic():
    assert R.math_score("\\sqrt{2}", "2^{1/2}", use_math_verify=True) == 1.0
    assert R.math_score("1+x^2", "x^2+1", use_math_verify=True) == 1.0
    assert R.math_score("x^2-1", "x^2+1", use_math_verify=True) == 0.0
    assert R.math_score("\\pi/2", "\\frac{\\pi}{2}", use_math_verify=True) == 1.0
    # math-verify would read a bare "4, 5" as its last number; wrapped in $...$ it is the set {4, 5}.
    assert R.math_score("4, 5", "5", use_math_verify=True) == 0.0


def test_math_fallback_is_exact():
    kw = dict(use_math_verify=False)
    assert R.math_score("x^2+1", "x^2 + 1", **kw) == 1.0  # whitespace-normalised exact string
    assert R.math_score("1+x^2", "x^2+1", **kw) == 0.0  # no algebra without math-verify
    assert R.math_score("x^2+1", "x^2+12", **kw) == 0.0
    assert R.math_score("A", "5", **kw) == 0.0  # no option-letter fallback for a numeric reference


@pytest.fixture
def without_math_verify(monkeypatch):
    """math_verify not importable, as on an install without it (a None entry in sys.modules fails the import)."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    assert not R.math_verify_available()


MATH_VERIFY_MISSING = r"math-verify cannot be imported .*: pip install math-verify"


def test_missing_math_verify_is_a_start_up_error_when_specs_are_parsed(without_math_verify):
    for entry in ("accuracy", "format_dyme,accuracy:0.5", [{"name": "accuracy", "kwargs": {"extract": "dyme"}}]):
        expected = r"reward entry .*accuracy.*: " + MATH_VERIFY_MISSING
        with pytest.raises(R.MissingDependencyError, match=expected) as info:
            R.parse_reward_specs(entry)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ImportError)  # the config check's type
        assert info.value.name == "math_verify" and "use_math_verify=False" in str(info.value)
    with pytest.raises(R.MissingDependencyError, match=MATH_VERIFY_MISSING):
        R.compute_rewards(["accuracy"], ["<answer>5</answer>"], [make_example("math", "5")])
    # Rewards that never score math, and an accuracy reward told not to use math-verify, still parse and score.
    assert [s.name for s in R.parse_reward_specs("format_dyme,think_f1,iou")] == ["format_dyme", "think_f1", "iou"]
    explicit = [{"name": "accuracy", "kwargs": {"use_math_verify": False}}]
    result = R.compute_rewards(explicit, ["<think>r</think><answer>1/2</answer>"], [make_example("math", "0.5")])
    assert result.per_reward.tolist() == [[1.0]]


def test_missing_math_verify_is_never_a_silent_substitute(without_math_verify, temp_reward):
    with pytest.raises(R.MissingDependencyError, match=MATH_VERIFY_MISSING):
        R.math_score("\\frac{1}{2}", "0.5")
    with pytest.raises(R.MissingDependencyError, match=MATH_VERIFY_MISSING):
        R.accuracy("<answer>5</answer>", make_example("math", "5"), extract="raw")
    assert R.math_score("\\frac{1}{2}", "0.5", use_math_verify=False) == 1.0
    # A custom reward that needs math-verify without declaring it fails the batch (not a column of counted zeros) ...
    undeclared = temp_reward("test_undeclared_math", lambda completion, example: R.math_score(completion, "5"))
    with pytest.raises(R.MissingDependencyError, match=MATH_VERIFY_MISSING):
        R.compute_rewards([undeclared], ["5"], [make_example("math", "5")])
    # ... and one that declares it, with a start-up check, fails when its spec is parsed.
    declared = temp_reward(
        "test_declared_math",
        lambda completion, example: R.math_score(completion, "5"),
        startup_check=lambda kwargs: R.require_math_verify(),
    )
    with pytest.raises(R.MissingDependencyError, match=r"reward entry 'test_declared_math': " + MATH_VERIFY_MISSING):
        R.parse_reward_specs(declared)


def test_math_verify_off_main_thread():
    """math-verify's signal timeouts only work on the main thread; off it we run without them."""
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            (R.math_score("\\frac{1}{2}", "0.5", use_math_verify=True), R.math_score("7", "5", use_math_verify=True))
        )
    )
    thread.start()
    thread.join()
    assert results == [(1.0, 0.0)]


# ---------------------------------------------------------------------------------------------------------------
# Strings


def test_string_score():
    assert R.string_score("Red", "red") == 1.0
    assert R.string_score("  The red one. ", "red one") == 1.0
    assert R.string_score('"red"', "red") == 1.0
    assert R.string_score("dark   red", "dark red") == 1.0
    assert R.string_score("red", "dark red") == 0.0
    assert R.string_score("reddish", "red") == 0.0
    assert R.string_score("", "red") == 0.0
    assert R.string_score("the", "a") == 0.0  # nothing left after normalisation


def test_accuracy_dyme_string():
    example = make_example("string", "Blue")
    assert R.accuracy("The sky is blue.\nAnswer: BLUE.", example, extract="dyme") == 1.0
    assert R.accuracy("The sky is blue.", example, extract="dyme") == 0.0  # no "answer:" flag
    assert R.accuracy("Answer: green", example, extract="dyme") == 0.0
    assert R.accuracy("so half.\nAnswer: .5.", make_example("number", "0.5"), extract="dyme") == 1.0


# ---------------------------------------------------------------------------------------------------------------
# IoU


def test_iou_values():
    assert R.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert R.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert R.iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert R.iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert R.iou([0, 0, 10, 10], [5, 5, 15, 15], inclusive=True) == pytest.approx(36 / (121 + 121 - 36))
    assert R.iou([0, 0, 10, 10], [10, 0, 20, 10], inclusive=True) == pytest.approx(11 / (121 + 121 - 11))
    assert R.iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # zero-area union
    assert R.iou([5, 5, 5, 5], [5, 5, 5, 5], inclusive=True) == 1.0  # one pixel


def test_iou_score():
    example = make_example("bbox", "[0, 0, 10, 10]", bbox=[0.0, 0.0, 10.0, 10.0])
    assert R.iou_score("[0, 0, 10, 10]", example) == 1.0
    assert R.iou_score("[5,5,15,15]", example) == pytest.approx(1 / 7)
    assert R.iou_score('{"bbox_2d": [0, 0, 10, 19]}', example, threshold=0.5) == 1.0  # 100/190 > 0.5
    assert R.iou_score("[0, 0, 10, 20]", example) == pytest.approx(0.5)
    assert R.iou_score("[0, 0, 10, 20]", example, threshold=0.5) == 0.0  # rule is IoU > 0.5
    assert R.iou_score("[0, 0, 10, 10] [0, 0, 10, 10]", example) == 0.0  # several boxes
    assert R.iou_score("[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]", example) == 0.0
    assert R.iou_score("the box is at the top left", example) == 0.0  # no box
    assert R.iou_score("[0, 0, ten, 10]", example) == 0.0  # malformed numbers
    assert R.iou_score("[0, 0, 10]", example) == 0.0
    assert R.iou_score("[10, 10, 0, 0]", example) == 0.0  # x2 < x1
    # Reference from the answer string when the bbox field is empty.
    assert R.iou_score("[0, 0, 10, 10]", make_example("bbox", "[0, 0, 10, 10]")) == 1.0


def test_accuracy_and_iou_rewards_on_bbox():
    example = make_example("bbox", "[0, 0, 10, 10]", bbox=[0.0, 0.0, 10.0, 10.0])
    completion = "<think>r</think><answer>[5, 5, 15, 15]</answer>"
    assert R.accuracy(completion, example) == 0.0  # IoU 1/7 <= 0.5
    assert R.accuracy(completion, example, iou_threshold=None) == pytest.approx(1 / 7)
    assert R.accuracy(completion, example, iou_threshold=0.1) == 1.0
    assert R.accuracy(completion, example, iou_threshold=None, inclusive_iou=True) == pytest.approx(36 / 206)
    assert R.iou_reward(completion, example) == pytest.approx(1 / 7)
    assert R.iou_reward("[5, 5, 15, 15]", example) == 0.0  # no answer block
    assert R.iou_reward("[5, 5, 15, 15]", example, extract="raw") == pytest.approx(1 / 7)


# ---------------------------------------------------------------------------------------------------------------
# Jaccard


def test_jaccard_score():
    assert R.jaccard_score("calm, warm", "calm, warm") == 1.0
    assert R.jaccard_score("Warm, CALM.", "calm, warm") == 1.0
    assert R.jaccard_score("calm", "calm, warm") == pytest.approx(1 / 2)
    assert R.jaccard_score("calm, sad, warm", "calm") == pytest.approx(1 / 3)
    assert R.jaccard_score("calm, sad", "calm, warm") == pytest.approx(1 / 3)
    assert R.jaccard_score("calm，warm", "calm, warm") == 1.0  # fullwidth comma
    assert R.jaccard_score("calm、warm", "calm, warm") == 1.0  # ideographic comma
    assert R.jaccard_score("calm warm", "calm, warm") == 1.0  # whitespace splits too (Curr-ReFT's rule)
    assert R.jaccard_score("['calm', 'warm']", "calm, warm") == 1.0
    assert R.jaccard_score("labels: ['calm']", "calm, warm") == pytest.approx(1 / 2)
    assert R.jaccard_score("[calm, warm", "calm, warm") == 1.0  # unparseable list: split instead
    assert R.jaccard_score("sad", "calm") == 0.0
    assert R.jaccard_score("", "calm") == 0.0
    assert R.jaccard_score(" , ", "calm") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# DyME thinking reward


def test_lemma():
    for a, b in [
        ("bars", "bar"),
        ("boxes", "box"),
        ("categories", "category"),
        ("increased", "increasing"),
        ("running", "run"),
        ("values", "value"),
        ("strings", "string"),
    ]:
        assert R.lemma(a) == R.lemma(b), (a, b)
    assert R.lemma("string") != R.lemma("str")


def test_think_f1():
    reference = "The red bar shows the highest sales in 2019."
    assert R.think_f1(reference, reference) == 1.0
    assert R.think_f1("Blue circles everywhere", reference) == 0.0
    assert R.think_f1("", reference) == 0.0
    assert R.think_f1("red bar", "") == 0.0
    assert R.think_f1("the of and is it", "the of and is it") == 0.0  # only stopwords
    # Stopwords ignored, plural matches singular: {red, bar} vs {red, bar, show, highest, sale, 2019}.
    assert R.think_f1("It is the red bars.", reference) == pytest.approx(2 * 1 * (2 / 6) / (1 + 2 / 6))
    # Hand-computed: thinking {cat, sit, mat, dog}, reference {cat, sit, mat}: P = 3/4, R = 1, F1 = 6/7.
    assert R.think_f1("A cat sits on the mat, a dog", "The cats sit on a mat") == pytest.approx(6 / 7)


def test_think_f1_reward():
    example = make_example("number", "3", reasoning="Count the red cubes: there are three red cubes.")
    assert R.think_f1_reward("Count the red cubes: three red cubes.\nAnswer: 3", example) == 1.0
    assert R.think_f1_reward("Answer: 3", example) == 0.0  # no thinking
    tagged = "<think>Count red cubes: three.</think><answer>3</answer>"
    assert R.think_f1_reward(tagged, example, extract="tags") == 1.0
    assert R.think_f1_reward("<answer>3</answer>", example, extract="tags") == 0.0
    with pytest.raises(ValueError):
        R.think_f1_reward(tagged, example, extract="raw")


# ---------------------------------------------------------------------------------------------------------------
# Accuracy dispatch


@pytest.mark.parametrize(
    "answer_type, answer, good, bad",
    [
        ("yesno", "no", "No, it is not.", "Yes."),
        ("choice", "C", "(C)", "A"),
        ("multi_choice", "A,C", "C, A", "A"),
        ("number", "-2.5", "-2.5", "2.5"),
        ("math", "\\frac{1}{2}", "1/2", "2"),
        ("string", "red", "Red.", "blue"),
        ("labels", "calm, warm", "warm, calm", "sad"),
    ],
)
def test_accuracy_dispatch(answer_type, answer, good, bad):
    example = make_example(answer_type, answer)
    assert R.accuracy(f"<think>r</think><answer>{good}</answer>", example) == 1.0
    assert R.accuracy(f"<think>r</think><answer>{bad}</answer>", example) == 0.0
    assert R.accuracy(f"<think>r</think> {good}", example) == 0.0  # no answer block
    assert R.accuracy(f"reasoning\nAnswer: {good}", example, extract="dyme") == 1.0


def test_accuracy_unknown_answer_type():
    with pytest.raises(ValueError, match="answer_type"):
        R.accuracy("<answer>x</answer>", make_example("essay", "x"))


# ---------------------------------------------------------------------------------------------------------------
# Registry, specs, combiner


def test_registry():
    for name in (
        "format_think_answer",
        "format_think_answer_bbox",
        "format_dyme",
        "format_answer_tag",
        "accuracy",
        "iou",
        "think_f1",
    ):
        assert R.get_reward(name) is R.REWARDS[name]
    with pytest.raises(KeyError, match="known rewards: .*accuracy"):
        R.get_reward("acuracy")
    with pytest.raises(ValueError, match="already registered"):
        R.register("accuracy")(lambda completion, example: 0.0)


def test_parse_reward_specs():
    specs = R.parse_reward_specs(
        [
            "format_dyme:0.5",
            "accuracy",
            {"name": "accuracy", "weight": 2, "kwargs": {"extract": "dyme"}},
            R.RewardSpec("think_f1", 0.25),
        ]
    )
    assert specs == (
        R.RewardSpec("format_dyme", 0.5),
        R.RewardSpec("accuracy", 1.0),
        R.RewardSpec("accuracy", 2.0, {"extract": "dyme"}),
        R.RewardSpec("think_f1", 0.25),
    )
    assert R.parse_reward_specs("format_dyme:0.5, accuracy") == specs[:2]
    assert R.parse_reward_specs(None) == ()
    assert R.parse_reward_specs({"name": "iou"}) == (R.RewardSpec("iou"),)


def test_parse_reward_specs_from_config_dict():
    ml_collections = pytest.importorskip("ml_collections")
    config = ml_collections.ConfigDict(
        {"rewards": [{"name": "accuracy", "weight": 1.5, "kwargs": {"partial_credit": 0.2}}, "format_think_answer"]}
    )
    assert R.parse_reward_specs(config.rewards) == (
        R.RewardSpec("accuracy", 1.5, {"partial_credit": 0.2}),
        R.RewardSpec("format_think_answer"),
    )


@pytest.mark.parametrize(
    "entry, message",
    [
        ("acuracy", "unknown reward 'acuracy'"),
        ("accuracy:heavy", "weight must be a number"),
        ("accuracy:nan", "weight must be finite"),
        ({"name": "accuracy", "weight": True}, "weight must be a number"),
        ({"name": "accuracy", "wieght": 2}, "unknown keys"),
        ({"name": "accuracy", "kwargs": {"partial": 0.2}}, "bad kwargs"),
        ({"name": "format_dyme", "kwargs": {"extract": "tags"}}, "bad kwargs"),
        ({"weight": 1.0}, "unknown reward None"),
        (3.0, "expected a RewardSpec"),
    ],
)
def test_parse_reward_specs_errors(entry, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        R.parse_reward_specs([entry])
    assert repr(entry) in str(info.value)  # the error names the entry


def test_compute_rewards_weights_and_shapes():
    examples = [make_example("yesno", "yes"), make_example("yesno", "no"), make_example("yesno", "no")]
    completions = ["<think>r</think><answer>yes</answer>", "<think>r</think><answer>yes</answer>", "no"]
    result = R.compute_rewards(["format_think_answer:0.5", "accuracy:2"], completions, examples)
    assert result.names == ("format_think_answer", "accuracy")
    assert result.per_reward.dtype == np.float32 and result.per_reward.shape == (3, 2)
    np.testing.assert_array_equal(result.per_reward, [[1, 1], [1, 0], [0, 0]])
    assert result.total.dtype == np.float32
    np.testing.assert_allclose(result.total, [2.5, 0.5, 0.0])
    assert result.failures == {"format_think_answer": 0, "accuracy": 0}


def test_compute_rewards_failures(temp_reward, caplog):
    def flaky(completion, example):
        if completion == "boom":
            raise RuntimeError("flaky reward exploded")
        return 1.0

    def nan_on_empty(completion, example):
        return math.nan if not completion else 0.5

    temp_reward("test_flaky", flaky)
    temp_reward("test_nan", nan_on_empty)
    examples = [make_example()] * 3
    with caplog.at_level(logging.WARNING, logger=R.__name__):
        result = R.compute_rewards(["test_flaky", "test_nan:2"], ["ok", "boom", ""], examples)
        R.compute_rewards(["test_flaky"], ["boom", "boom"], examples[:2])
    np.testing.assert_array_equal(result.per_reward, [[1.0, 0.5], [0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(result.total, [2.0, 1.0, 1.0])
    assert result.failures == {"test_flaky": 1, "test_nan": 1}
    warnings = [r.getMessage() for r in caplog.records if "test_flaky" in r.getMessage()]
    assert len(warnings) == 1 and "flaky reward exploded" in warnings[0]  # once per reward name
    metrics = result.metrics()
    assert metrics["rewards/test_flaky/failures"] == 1.0
    assert metrics["rewards/test_flaky/mean"] == pytest.approx(2 / 3)


def test_compute_rewards_repeated_names_and_metrics():
    examples = [make_example("number", "3"), make_example("number", "4")]
    completions = ["<think>r</think><answer>3</answer>", "Answer: 4"]
    result = R.compute_rewards(
        ["accuracy", {"name": "accuracy", "kwargs": {"extract": "dyme"}}, "format_dyme"], completions, examples
    )
    assert result.names == ("accuracy#0", "accuracy#1", "format_dyme")
    np.testing.assert_array_equal(result.per_reward, [[1, 0, 0], [0, 1, 1]])
    metrics = result.metrics()
    assert set(metrics) == {
        f"rewards/{n}/{s}" for n in result.names for s in ("mean", "std", "failures", "timeouts")
    } | {
        "rewards/total/mean",
        "rewards/total/std",
    }
    assert metrics["rewards/accuracy#0/mean"] == 0.5
    assert metrics["rewards/total/mean"] == pytest.approx(1.5)
    assert all(isinstance(v, float) for v in metrics.values())


def test_compute_rewards_errors_and_empty():
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        R.compute_rewards(["accuracy"], ["a", "b"], [make_example()])
    with pytest.raises(ValueError, match="unknown reward"):
        R.compute_rewards(["nope"], ["a"], [make_example()])
    empty = R.compute_rewards(["accuracy"], [], [])
    assert empty.per_reward.shape == (0, 1) and empty.total.shape == (0,)
    assert math.isnan(empty.metrics()["rewards/total/mean"])


def test_iou_reward_scores_box_less_examples_zero():
    labels = make_example("labels", "calm")
    assert R.iou_reward("<answer>[0, 0, 10, 10]</answer>", labels) == 0.0
    assert R.iou_reward("<answer>calm</answer>", labels) == 0.0
    box = make_example("bbox", "[0, 0, 10, 10]", bbox=[0.0, 0.0, 10.0, 10.0])
    assert R.iou_reward("<answer>[0, 0, 10, 10]</answer>", box) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Property: every built-in reward returns a finite value in [0, 1] and never fails on well-formed examples

PROPERTY_EXAMPLES = [
    make_example("yesno", "yes", reasoning="The cat is on the mat."),
    make_example("multi_choice", "A,C"),
    make_example("number", "12"),
    make_example("math", "\\frac{1}{2}"),
    make_example("string", "red"),
    make_example("bbox", "[0, 0, 10, 10]", bbox=[0.0, 0.0, 10.0, 10.0]),
    make_example("labels", "calm, warm", reasoning="calm warm colours"),
]
FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "Answer:",
    "answer:",
    "\n",
    " ",
    "yes",
    "no",
    "A",
    "(B)",
    "C,",
    "12",
    "-3.5",
    "1,000",
    "\\frac{1}{2}",
    "$",
    "\\boxed{",
    "}",
    "[0, 0, 10, 10]",
    "[1, 2,",
    "]",
    "calm",
    "，",
    "the cat",
    "['x', 'y']",
    "{",
    "nan",
    "inf",
    "1e400",
    "^",
    "x",
]
completion_strategy = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=12).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions=st.lists(completion_strategy, min_size=len(PROPERTY_EXAMPLES), max_size=len(PROPERTY_EXAMPLES)))
def test_property_builtin_rewards_bounded(completions):
    """Found by this property: `iou` used to raise on a box predicted for a box-less example (a counted failure)
    but score 0 when no box was predicted; now such examples always score 0."""
    specs = [R.RewardSpec(name) for name in BUILTIN_REWARDS]
    result = R.compute_rewards(specs, completions, PROPERTY_EXAMPLES)
    assert result.failures == dict.fromkeys(BUILTIN_REWARDS, 0)
    assert np.all(np.isfinite(result.per_reward))
    assert np.all((result.per_reward >= 0) & (result.per_reward <= 1))
    for completion, example in zip(completions, PROPERTY_EXAMPLES):
        for name in BUILTIN_REWARDS:
            value = R.get_reward(name)(completion, example)
            assert isinstance(value, float) and 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# Bounded in time (issue 18): the tester's slow inputs and more, on the main thread and off it. Time is bounded in
# CPU seconds of this process, its finished children and the live math-verify worker, never in wall time.


def cpu_seconds() -> float:
    """CPU time of this process, of its waited-for children (killed workers) and of the live math worker."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system + R.MATH_WORKER.cpu_seconds()


# Per reward call: the math budget, plus the worker's answer and all parsing on the caller's side, with room to spare.
CPU_BOUND_S = 3 * R.MATH_TIME_BUDGET_S + 2.0
ANSWER = "<think>reasoning</think><answer>{}</answer>"
HOSTILE = {
    # The tester's cases (before: 5.0 s, 5.6 s, 5 s on the main thread; unbounded off it; 50 s; 1.5-4.6 s).
    "power tower 10^{10^{10}}": ANSWER.format("10^{10^{10}}"),
    "power tower 9^{9^{9^{9^{9}}}}": ANSWER.format("9^{9^{9^{9^{9}}}}"),
    "3,001-character x^x^...^x": ANSWER.format("x^" * 1500 + "x"),
    "format regex, 230 KB": "<think>" + "</think><answer>" * 14375,
    "label list, 1 MB": ANSWER.format("[" + "'label1', " * 100000 + "]"),
    "label list of ints, 1 MB": ANSWER.format("[" + "1, " * 333000 + "]"),
    # More of the same kinds.
    "huge completion, 250 KB": ANSWER.format("5") + " filler" * 42000,
    "huge thinking, 250 KB": "<think>" + "the cat sat on the mat " * 11000 + "</think><answer>yes</answer>",
    "deep braces": ANSWER.format("{" * 5000 + "1" + "}" * 5000),
    "braces nested 7": ANSWER.format("{" * 7 + "1" + "}" * 7),
    "parentheses nested 7": ANSWER.format("(" * 7 + "1" + ")" * 7),
    "\\frac nested 300": ANSWER.format("\\frac{1}{" * 300 + "1" + "}" * 300),
    "\\frac chain 40": ANSWER.format("\\frac{1}{2}" * 40),
    "digits 100,000": ANSWER.format("9" * 100000),
    "digits 500": ANSWER.format("9" * 500),
    "digits outside the answer": "9" * 300000 + ANSWER.format("5"),
    "factorial of a factorial": ANSWER.format("(9!)!"),
    "factorial chain": ANSWER.format("9!" * 1500),
    "factorial of 10^{10}": ANSWER.format("{10^{10}}!"),
    "binomial of powers": ANSWER.format("\\binom{10^{9}}{10^{5}}"),
    "power of a power group": ANSWER.format("(10^{99999})^{99999}"),
    "x^{x^{x}} (passes the pre-check)": ANSWER.format("x^{x^{x}}"),
    # Found by tests/test_fuzz_rewards.py: passes every pre-check, yet verify() against 5 or 1/2 runs for minutes.
    "\\log(2)+9999910 (stopped by the budget)": ANSWER.format("\\log(2)+9999910"),
    "many answer tags": "<think>r</think>" + "<answer>5</answer>" * 20000,
    "unbalanced open tags": "<think>" * 30000 + "<answer>" * 30000,
    "unbalanced close tags": "</answer>" * 30000 + "<answer>5",
    "closing before opening": "</think></answer><think><answer>" * 10000,
    "many answer: flags": "Answer: 5\n" * 30000,
    "many boxes": ANSWER.format("[1, 2, 3, 4] " * 20000),
    "box digits": ANSWER.format("[" + "1" * 50000 + ", 2, 3, 4]"),
    "unicode whitespace": "<think>\u3000r\u2028</think>\u00a0\u2003<answer>\u205f5\u3000</answer>" * 5000,
    "long label list under the answer cap": ANSWER.format("[" + "'calm', " * 120 + "]"),
}
HOSTILE_EXAMPLES = [
    make_example("math", "5"),
    make_example("math", "\\frac{1}{2}"),
    make_example("yesno", "yes", reasoning="The cat is on the mat."),
    make_example("multi_choice", "A,C"),
    make_example("number", "5"),
    make_example("string", "red"),
    make_example("bbox", "[0, 0, 10, 10]", bbox=[0.0, 0.0, 10.0, 10.0]),
    make_example("labels", "calm, warm", reasoning="calm warm colours"),
]
HOSTILE_SPECS = [R.RewardSpec(name) for name in BUILTIN_REWARDS] + [
    R.RewardSpec("accuracy", kwargs={"extract": "dyme"}),
    R.RewardSpec("accuracy", kwargs={"extract": "raw"}),
    R.RewardSpec("think_f1", kwargs={"extract": "tags"}),
]


def score_hostile() -> dict[tuple[str, int, int], tuple[float, float, bool]]:
    """(case, example index, spec index) -> (value, CPU seconds, whether the math budget ran out) for every hostile
    case, example and spec."""
    out = {}
    for case, completion in HOSTILE.items():
        for e, example in enumerate(HOSTILE_EXAMPLES):
            for s, spec in enumerate(HOSTILE_SPECS):
                start, timeouts = cpu_seconds(), R.timeouts_so_far()
                value = R.get_reward(spec.name)(completion, example, **spec.kwargs)
                out[case, e, s] = (value, cpu_seconds() - start, R.timeouts_so_far() > timeouts)
    return out


@pytest.fixture(scope="module")
def hostile_scores_main_thread():
    R.math_score("1", "1")  # the worker's start-up (imports) is not part of any completion's time
    return score_hostile()


def check_hostile(scores):
    for (case, e, s), (value, cpu, _) in scores.items():
        where = f"{case!r} x {HOSTILE_EXAMPLES[e]['answer_type']} x {HOSTILE_SPECS[s]}"
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, where
        assert cpu <= CPU_BOUND_S, f"{where}: {cpu:.2f} s of CPU"
    # The budget, not a pre-check, stops this one (math examples 0 and 1, the default accuracy spec 0).
    accuracy = BUILTIN_REWARDS.index("accuracy")
    assert all(scores["\\log(2)+9999910 (stopped by the budget)", e, accuracy][2] for e in (0, 1))
    assert not any(timed_out for (case, _, _), (_, _, timed_out) in scores.items() if "budget" not in case)


def test_hostile_completions_are_bounded_on_the_main_thread(hostile_scores_main_thread):
    check_hostile(hostile_scores_main_thread)
    # The caps score what they cut 0, whatever the answer; the correct short answer still scores 1.
    math_accuracy = {
        case: hostile_scores_main_thread[case, 0, BUILTIN_REWARDS.index("accuracy")][0] for case in HOSTILE
    }
    assert math_accuracy["huge completion, 250 KB"] == 0.0  # over MAX_COMPLETION_CHARS
    assert math_accuracy["digits outside the answer"] == 0.0
    assert math_accuracy["power tower 10^{10^{10}}"] == 0.0
    assert R.accuracy(ANSWER.format("5"), HOSTILE_EXAMPLES[0]) == 1.0
    fmt = BUILTIN_REWARDS.index("format_think_answer")
    assert hostile_scores_main_thread["huge thinking, 250 KB", 0, fmt][0] == 1.0  # no cap on the format, linear
    assert hostile_scores_main_thread["format regex, 230 KB", 0, fmt][0] == 0.0


def test_hostile_completions_are_bounded_off_the_main_thread(hostile_scores_main_thread):
    """Same values from a threading.Thread (no signal-based timeouts there), within the same CPU bound."""
    results = []
    thread = threading.Thread(target=lambda: results.append(score_hostile()))
    thread.start()
    thread.join()
    (scores,) = results
    check_hostile(scores)
    assert {key: value for key, (value, _, _) in scores.items()} == {
        key: value for key, (value, _, _) in hostile_scores_main_thread.items()
    }


@pytest.mark.parametrize(
    "text, reason",
    [
        ("10^{10^{10}}", "nested power of numbers only"),
        ("9^{9^9}", "nested power of numbers only"),
        ("(10^{9})^{9}", "nested power of numbers only"),
        ("9^{9^{9^{9^{9}}}}", "nested power of numbers only"),  # found before its height
        ("x^x^x^x", "power tower"),
        ("x^{y^{z^{w}}}", "power tower"),
        ("2^{1000000}", "integer exponent"),
        ("{" * 7 + "1" + "}" * 7, "nested deeper"),
        ("\\left(" * 7 + "1" + "\\right)" * 7, "nested deeper"),
        ("x" * 513, "over 512 characters"),
        ("10000!", "factorial of an integer"),
        ("(9!)!", "factorial of a factorial or of a power"),
        ("{10^{10}}!", "factorial of a factorial or of a power"),
        ("1!" * 9, "more than 8 factorials"),
        ("\\binom{10^{9}}{10^{5}}", "binomial"),
        ("\\binom{100000}{3}", "binomial"),
    ],
)
def test_math_input_problem_rejects(text, reason):
    assert reason in R.math_input_problem(text)


@pytest.mark.parametrize(
    "text",
    [
        "5",
        "\\frac{\\sqrt{3}}{2}",
        "e^{-x^2}",
        "2^{2^n}",
        "x^x^x",
        "x^2+2x+1",
        "2^{10}",
        "10^{6}",
        "(n+1)!",
        "5!",
        "9999!",
        "a \\! b",
        "x != 3",
        "\\binom{5}{2}",
        "\\left(\\frac{1}{2}\\right)^{2}",
        "\\boxed{\\left(\\frac{\\sqrt{3}}{2}, \\frac{1}{2}\\right)}",
        "(-\\infty, 3] \\cup [5, \\infty)",
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        "9" * 500,
    ],
)
def test_math_input_problem_passes_real_answers(text):
    assert R.math_input_problem(text) is None


def test_math_pre_check_keeps_exact_matches_and_scores_references_by_the_fallback():
    # A rejected prediction scores by exact string match only; a rejected reference as one math-verify cannot parse.
    assert R.math_score("10^{10^{10}}", "5") == 0.0
    assert R.math_score("10^{10^{10}}", "10^{10^{10}}") == 1.0
    assert R.math_score(" 10^{10^{10}} ", "10^{10^{10}}") == 1.0
    assert R.math_score("2.5", "\\frac{10^{10^{1}}}{4 \\cdot 10^{9}}") == 0.0  # numbers fallback: not a simple number
    assert R.math_score("0.5", "\\frac{1}{2}") == 1.0


def test_math_outcomes_are_kept_for_repeated_questions():
    """A group's rollouts often repeat one answer: the second identical question costs no worker time."""
    fresh = f"\\sqrt{{{os.getpid()}}}"
    assert R.math_score(fresh, "5") == 0.0
    worker_cpu = R.MATH_WORKER.cpu_seconds()
    assert [R.math_score(fresh, "5") for _ in range(64)] == [0.0] * 64
    assert R.MATH_WORKER.cpu_seconds() == worker_cpu


def test_math_time_budget_scores_unverified_and_counts_a_timeout(caplog):
    """A tower of fresh symbols (SymPy caches what it has seen) passes the pre-check and needs far more than 1 ms of
    math-verify's CPU: parsing, then comparing."""
    tight = {"math_time_budget_s": 0.001}
    symbol = f"z_{{{os.getpid()}}}"
    tower = f"{symbol}^{{{symbol}^{{{symbol}}}}}"
    examples = [make_example("math", "5"), make_example("math", tower), make_example("math", "5")]
    completions = [ANSWER.format(tower), ANSWER.format(tower), ANSWER.format("5")]
    specs = [{"name": "accuracy", "kwargs": tight}, "format_think_answer"]
    R._warned.discard("timeout")
    with caplog.at_level(logging.WARNING, logger=R.__name__):
        result = R.compute_rewards(specs, completions, examples)
    # Over the budget: unverified, so only an exact string match scores (the second row); "5" vs "5" stays exact too.
    np.testing.assert_array_equal(result.per_reward[:, 0], [0.0, 1.0, 1.0])
    assert result.timeouts == {"accuracy": 2, "format_think_answer": 0}
    assert result.failures == {"accuracy": 0, "format_think_answer": 0}
    assert result.metrics()["rewards/accuracy/timeouts"] == 2.0
    assert any("time budget" in record.getMessage() for record in caplog.records)
    assert R.accuracy(ANSWER.format(tower), examples[0]) == 0.0  # the default budget: verified, different


def test_math_worker_that_does_not_answer_is_killed_and_restarted():
    """A stopped worker (SIGSTOP: it cannot answer, whatever the machine's speed) is killed at the wall limit, the
    call is a timeout, and the next call starts a fresh worker."""
    fresh = f"{os.getpid()}.25"  # a question the worker has not answered yet (answers are kept)
    assert R.math_score(fresh, fresh) == 1.0
    pid, kills = R.MATH_WORKER.pid, R.MATH_WORKER.kills
    os.kill(pid, signal.SIGSTOP)
    assert R.MATH_WORKER.verify("$5$", f"${fresh}$", budget_s=1.0, wall_limit_s=0.5) == "timeout"
    assert R.MATH_WORKER.kills == kills + 1 and R.MATH_WORKER.pid is None
    assert R.math_score(f"{fresh}+1", fresh) == 0.0  # a fresh worker answers
    assert R.MATH_WORKER.pid not in (None, pid)
    assert R.MATH_WORKER.verify("$5$", f"${fresh}$", budget_s=1.0) == "different"  # the kill was not kept


def test_math_worker_that_died_is_restarted():
    """Killed between calls, the worker is replaced: the next call either sees it gone and starts a fresh one, or
    (killed while the call writes) reads no answer, which is a counted timeout; the call after that is answered."""
    fresh = f"{os.getpid()}.75"  # questions the worker has not answered yet (answers are kept)
    assert R.math_score(fresh, "5") == 0.0
    pid, timeouts = R.MATH_WORKER.pid, R.timeouts_so_far()
    os.kill(pid, signal.SIGKILL)
    first = R.math_score(fresh, f"{fresh}0")
    assert first == 1.0 or (first == 0.0 and R.timeouts_so_far() == timeouts + 1)
    assert R.math_score(fresh, f"{fresh}00") == 1.0
    assert R.MATH_WORKER.pid not in (None, pid)


def test_length_caps_and_their_kwargs():
    math5, yes = make_example("math", "5"), make_example("yesno", "yes")
    long_answer = ANSWER.format("yes" + "." * 2000)
    assert R.accuracy(long_answer, yes) == 0.0  # answer over MAX_ANSWER_CHARS
    assert R.accuracy(long_answer, yes, max_answer_chars=4096) == 1.0
    padded = ANSWER.format("5") + "." * R.MAX_COMPLETION_CHARS
    assert R.accuracy(padded, math5) == 0.0
    assert R.accuracy(padded, math5, max_completion_chars=2 * R.MAX_COMPLETION_CHARS) == 1.0
    raw = "yes " + "." * 3000  # extract="raw": the completion is the answer, only the completion cap applies
    assert R.accuracy(raw, make_example("yesno", "yes"), extract="raw") == 1.0
    box = make_example("bbox", "[0, 0, 10, 10]", bbox=[0.0, 0.0, 10.0, 10.0])
    assert R.iou_reward(ANSWER.format("[0, 0, 10, 10]") + " " * R.MAX_COMPLETION_CHARS, box) == 0.0
    assert R.iou_reward(ANSWER.format("[0, 0, 10, 10]" + "." * 2000), box) == 0.0
    assert R.iou_reward(ANSWER.format("[0, 0, 10, 10]" + "." * 2000), box, max_answer_chars=4096) == 1.0
    thinking = make_example(reasoning="the cat sat")
    assert R.think_f1_reward("the cat sat answer: x", thinking) == 1.0
    assert R.think_f1_reward("the cat sat answer: x" + " " * R.MAX_COMPLETION_CHARS, thinking) == 0.0


def test_label_lists_over_the_literal_cap_are_split():
    long_list = "[" + ", ".join(["'calm'"] * 1000) + "]"
    assert len(long_list) > R.MAX_LITERAL_CHARS
    assert R.label_set(long_list) == {"calm"}  # split on commas, brackets and quotes stripped
    assert R.label_set("['calm', 'warm']") == {"calm", "warm"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_answer_chars": 0}, "kwargs['max_answer_chars'] must be a positive integer, got 0"),
        ({"max_completion_chars": 1.5}, "kwargs['max_completion_chars'] must be a positive integer, got 1.5"),
        ({"max_answer_chars": True}, "kwargs['max_answer_chars'] must be a positive integer, got True"),
        ({"math_time_budget_s": 0}, "kwargs['math_time_budget_s'] must be seconds > 0, got 0"),
        ({"math_time_budget_s": math.inf}, "kwargs['math_time_budget_s'] must be seconds > 0, got inf"),
        ({"math_time_budget_s": "1"}, "kwargs['math_time_budget_s'] must be seconds > 0, got '1'"),
    ],
)
def test_limit_kwargs_are_checked_when_specs_are_parsed(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        R.parse_reward_specs([{"name": "accuracy", "kwargs": kwargs}])
    assert "reward entry" in str(info.value)
