"""Verifiable rewards: score completion strings against examples (`jaxvlm.data.example`), on the host.

Pure Python + numpy (no jax): the trainer decodes the sampled completions, calls `compute_rewards` and feeds the
float32 [N, R] matrix to `jaxvlm.losses`. `completions[i]` is scored against `examples[i]`; the trainer repeats
each prompt's example G times.

Registry: a reward is `fn(completion: str, example: Mapping, **kwargs) -> float`, registered by name with
`@register("name")`; `parse_reward_specs` turns config entries into `RewardSpec(name, weight, kwargs)` and runs each
reward's start-up check (the accuracy reward's: math-verify imports), so a missing package stops a run before it
starts, never in the middle. Built in:
format_think_answer and format_think_answer_bbox (Curr-ReFT), format_dyme (DyME), format_answer_tag (an answer block
alone, for format-only stages such as CLGRPO's stage 2), accuracy (dispatched on `answer_type`), iou (continuous),
think_f1 (DyME's local thinking reward) and soft_overlong (DAPO's length penalty, on the completion's token count).

A reward that takes the keyword argument `completion_length` (`LENGTH_KWARG`) is given each completion's length in
tokens by `compute_rewards(..., lengths=)` (the sampler's lengths, stop token included); its config entry cannot set
it. A reward that takes `max_completion_len` gets the stage's `sampling.max_new_tokens` when its entry leaves it
unset (`parse_reward_specs(..., max_new_tokens=)`).

Departures from the papers' code (each also stated where it happens):
  * Tags: no complete `<answer>` block, or several, is no answer (Curr-ReFT uses the whole text / the first block);
    the format reward wants each tag once (Curr-ReFT's `.*?` regex accepts `<answer>1</answer><answer>2</answer>`).
  * Detection format: a bare `[x1, y1, x2, y2]` (Curr-ReFT wants it inside `{...}`), decimals allowed, one box only.
  * DyME: no "answer:" is no answer (DyME compares the whole text, which almost never matches).
  * Yes/no: the no-words need word boundaries too ("nothing" is not "no"); yes- and no-words together score 0.
  * Choice: letter sets (order-insensitive), A-J (Curr-ReFT: ordered string, A-E); a lone lowercase letter counts.
  * Numbers: exactly one distinct number ("3 or 4" scores 0). Tolerance 0 by default, as DyME trains.
  * Math: math-verify (a dependency) with (gold, prediction) in its documented order; numbers then exact strings
    for a reference it cannot parse or with `use_math_verify=False`; never
    Curr-ReFT's stage-3 fallbacks (empty option-letter lists compare equal, substring containment), which give
    `<answer>7</answer>` vs "5" a reward of 1.
  * IoU: exactly one predicted box (Curr-ReFT reads the first); plain area formula unless `inclusive=True`.
  * Jaccard: surrounding punctuation stripped from each label.
  * think_f1: no spaCy (stopword list + rule lemmatiser instead of POS filter + lemmas); exact F1 (DyME adds 1e-6).

Bounded in time, on any thread (a batch holds 64+ rollouts, some of them degenerate):
  * Length caps, checked before any parsing (a real answer is short). accuracy, iou and think_f1 score 0 on a
    completion over `MAX_COMPLETION_CHARS` (32,768 characters; kwarg `max_completion_chars`); accuracy and iou score
    0 on an extracted answer ("tags"/"dyme") over `MAX_ANSWER_CHARS` (1,024; kwarg `max_answer_chars`); with
    extract="raw" the answer is the whole completion, bounded by the completion cap. A label list longer than
    `MAX_LITERAL_CHARS` (4,096) is split, not `ast.literal_eval`-ed.
  * Cheap checks first and linear patterns: tag counts (`str.count`) before any regex; no regex here has nested
    quantifiers, and the lazy `.*?` of the format reward only runs once each tag is known to occur once (linear then).
  * Math: `math_input_problem` keeps from math-verify texts over `MAX_MATH_CHARS` (512), brackets nested deeper
    than `MAX_MATH_NESTING` (6), power towers of more than `MAX_POWER_TOWER` (2) carets, nested powers of numbers
    only (`10^{10^{10}}`, `(10^{9})^{9}`), integer exponents over `MAX_EXPONENT_DIGITS` (5) digits, factorials of
    integers over `MAX_FACTORIAL_DIGITS` (4) digits, of factorials or of powers, more than `MAX_FACTORIALS` (8)
    factorials, and binomials of powers or long integers. A prediction it rejects scores by exact string match
    only; a reference it rejects is scored like one math-verify cannot parse (numbers, then exact strings).
  * Math time budget: what passes runs in a math-verify worker process (`MathVerifyWorker`: started on first use,
    reused) with a budget of `MATH_TIME_BUDGET_S` (1 s of the worker's CPU time per completion; kwarg
    `math_time_budget_s`), enforced in the worker by a CPU-time timer and by the caller, which kills (and later
    restarts) a worker that does not answer within `math_wall_limit_s(budget)` = 4 x budget + 2 s of wall time (a
    computation stuck in C ignores the timer). No signal reaches the calling thread, so the budget holds off the
    main thread too. A prediction over the budget scores as unverified (exact string match only) and is counted in
    `rewards/<name>/timeouts` (`RewardResult.timeouts`). The worker's last 4,096 outcomes are kept, so a group's
    repeated degenerate answer costs its budget once; a batch of G distinct ones costs up to G budgets.
"""

from __future__ import annotations

import ast
import atexit
import collections
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxvlm import checks

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]
StartupCheck = Callable[[Mapping[str, Any]], None]
REWARDS: dict[str, RewardFn] = {}
STARTUP_CHECKS: dict[str, StartupCheck] = {}


class MissingDependencyError(ImportError, ValueError):
    """A reward needs a package that cannot be imported. Also a ValueError, like every other bad reward entry, so the
    config check reports it under the stage's `rewards` key."""


def register(name: str, *, startup_check: StartupCheck | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add `fn(completion, example, **kwargs) -> float` to `REWARDS` under `name` (names are unique).

    `startup_check(kwargs)` runs when a spec of the reward is parsed (`parse_reward_specs`, which the config check
    calls at start-up) and raises what scoring would otherwise meet mid-run, e.g. `require_math_verify()`.
    """

    def decorate(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        STARTUP_CHECKS.pop(name, None)
        if startup_check is not None:
            STARTUP_CHECKS[name] = startup_check
        return fn

    return decorate


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`; KeyError listing the known names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction

_DYME_FLAG = re.compile(r"answer:", re.IGNORECASE)


# Length caps (module docstring): a completion / an extracted answer longer than this scores 0 for accuracy, iou and
# think_f1; a label list longer than MAX_LITERAL_CHARS is split instead of `ast.literal_eval`-ed.
MAX_COMPLETION_CHARS = 32_768
MAX_ANSWER_CHARS = 1_024
MAX_LITERAL_CHARS = 4_096


def _single_block(completion: str, tag: str) -> str | None:
    """Content of the one `<tag>...</tag>` block, or None when there is none, an unclosed one, or several.
    Counts, then two `str.find`s: linear in the completion's length."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    if completion.count(opening) != 1 or completion.count(closing) != 1:
        return None
    start = completion.find(opening) + len(opening)
    end = completion.find(closing, start)
    return completion[start:end].strip() if end >= 0 else None


def _over_caps(
    completion: str, answer: str | None, extract: str, max_completion_chars: int, max_answer_chars: int
) -> bool:
    """Whether a completion, or its extracted answer (not with extract="raw": that is the completion), is over its
    length cap: such a completion scores 0 before any parser sees it."""
    if len(completion) > max_completion_chars:
        return True
    return answer is not None and extract != "raw" and len(answer) > max_answer_chars


# How `extract_answer` may read a completion: the values of the `extract` kwarg of accuracy and iou (checked when a
# reward spec is parsed, so a misspelt one stops the run at start-up naming the config key).
EXTRACT_STYLES = ("tags", "dyme", "raw", "last_number", "boxed")
# How `thinking_text` may split off the reasoning: the values of think_f1's `extract` ("raw" has no answer to split).
THINKING_STYLES = ("tags", "dyme", "last_number", "boxed")
_BOXED = "\\boxed{"


def _last_number_token(completion: str) -> re.Match | None:
    """The last number token (`_NUMBER_TOKEN`: "1,000" is one number, "-3" keeps its sign) in `completion`, or None.
    One left-to-right scan: linear in the completion's length."""
    last = None
    for match in _NUMBER_TOKEN.finditer(completion):
        last = match
    return last


def _last_boxed_span(completion: str) -> tuple[int, int] | None:
    """(start of the last `\\boxed{`, end of its content) with nested braces matched, or None when there is no
    `\\boxed{` or the last one is never closed. One `rfind`, then one scan forward: linear."""
    start = completion.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    for i in range(start + len(_BOXED), len(completion)):
        char = completion[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return start, i
    return None


def extract_answer(completion: str, style: str = "tags") -> str | None:
    """The predicted answer in `completion`, or None when there is none.

    "tags": the content of the single `<answer>...</answer>` block (Curr-ReFT / R1-V prompts); None without a complete
            block and None when there are several (ambiguous). Curr-ReFT uses the whole completion in the first case
            and the first block in the second.
    "dyme": the first non-empty line after the LAST "answer:" (any case), with markdown `*` and whitespace stripped
            (DyME's `ExplicitPromptRelaxedCorrectness._get_final_answer`); None when "answer:" is absent.
    "raw":  the whole completion, stripped.
    "last_number": the last number in the completion, as written ("1,000" is one number, as `parse_single_number`
            reads it; a sign directly before the digits is kept); None without a number. For small models that
            reason in prose and end with the result ("... so she has 7 apples.").
    "boxed": the content of the LAST `\\boxed{...}` (nested braces matched: `\\boxed{\\frac{1}{2}}` gives
            `\\frac{1}{2}`), stripped; None without one or when it is never closed.
    Extracted answers (not "raw") are length-capped by the rewards (`max_answer_chars`).
    """
    if style == "tags":
        return _single_block(completion, "answer")
    if style == "dyme":
        flags = list(_DYME_FLAG.finditer(completion))
        if not flags:
            return None
        lines = (line.strip().strip("*").strip() for line in completion[flags[-1].end() :].split("\n"))
        return next((line for line in lines if line), "")
    if style == "raw":
        return completion.strip()
    if style == "last_number":
        match = _last_number_token(completion)
        return None if match is None else match.group()
    if style == "boxed":
        span = _last_boxed_span(completion)
        return None if span is None else completion[span[0] + len(_BOXED) : span[1]].strip()
    raise ValueError(f"unknown answer extraction style {style!r} (expected one of {EXTRACT_STYLES})")


def dyme_thinking(completion: str) -> str:
    """DyME's thinking text: everything before the first "answer:" (any case); the whole text when it is absent."""
    match = _DYME_FLAG.search(completion)
    return (completion[: match.start()] if match else completion).strip()


def thinking_text(completion: str, style: str) -> str | None:
    """The reasoning part of `completion` for the answer `style` (think_f1's input), or None when there is none.

    "dyme": `dyme_thinking`; "tags": the single `<think>` block; "boxed": the text before the last `\\boxed{`
    (the whole text without one); "last_number": the text before the last number (the whole text without one), so
    "..., so 4 + 3 = 7. The answer is 7." gives "..., so 4 + 3 = 7. The answer is".
    """
    if style == "dyme":
        return dyme_thinking(completion)
    if style == "tags":
        return _single_block(completion, "think")
    if style == "boxed":
        start = completion.rfind(_BOXED)
        return (completion[:start] if start >= 0 else completion).strip()
    if style == "last_number":
        match = _last_number_token(completion)
        return (completion[: match.start()] if match else completion).strip()
    raise ValueError(f"think_f1: extract must be one of {THINKING_STYLES}, got {style!r}")


# ----------------------------------------------------------------------------------------------------------------
# Format rewards

_THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


@register("format_think_answer")
def format_think_answer(completion: str, example: Mapping | None = None) -> float:
    """Curr-ReFT's format reward: `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, DOTALL)` on the
    stripped completion, AND each of the four tags exactly once. The count check is stricter than Curr-ReFT: its lazy
    `.*?` still lets `<think>..</think><answer>1</answer><answer>2</answer>` match, and we do not reward two answers.
    It also runs first: on `<think>` + `</think><answer>` x 14,000 (230 KB) the full match alone took 50 s."""
    text = completion.strip()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if not all(text.count(tag) == 1 for tag in tags):  # first: with each tag once, the lazy regex below is linear
        return 0.0
    return float(_THINK_ANSWER.fullmatch(text) is not None)


@register("format_think_answer_bbox")
def format_think_answer_bbox(completion: str, example: Mapping | None = None) -> float:
    """Curr-ReFT's detection format reward: `format_think_answer` and exactly one `[x1, y1, x2, y2]` list of numbers
    in the answer. Curr-ReFT's regex wants the list inside a JSON-ish `{...}` and integer coordinates; we also accept
    the bare list and decimals, but not several boxes."""
    if not format_think_answer(completion):
        return 0.0
    answer = _single_block(completion, "answer")
    return float(answer is not None and len(_BOX.findall(answer)) == 1)


@register("format_dyme")
def format_dyme(completion: str, example: Mapping | None = None) -> float:
    """DyME's format reward (`RewardCalculatorLocal.get_format_reward`, min_thinking_length 0): "answer:" in any case
    occurs exactly once."""
    return float(len(_DYME_FLAG.findall(completion)) == 1)


@register("format_answer_tag")
def format_answer_tag(completion: str, example: Mapping | None = None) -> float:
    """Exactly one complete `<answer>...</answer>` block; no `<think>` needed (format-only stages)."""
    return float(_single_block(completion, "answer") is not None)


_FINAL_ANSWER_FLAG = re.compile(r"the answer is", re.IGNORECASE)


@register("format_final_answer")
def format_final_answer(completion: str, example: Mapping | None = None) -> float:
    """The "final_answer" prompt style's format (jaxvlm.data.prompts): "the answer is" (any case) occurs exactly once,
    and the completion ends with it followed by one number and an optional full stop ("... The answer is 7."; a ':'
    after "is" is allowed). Whether the number is right is accuracy's business. Linear: one scan for the phrase,
    then a match on the tail, only when it is short."""
    text = completion.rstrip()
    flags = list(_FINAL_ANSWER_FLAG.finditer(text))
    if len(flags) != 1:
        return 0.0
    tail = text[flags[0].end() :].strip().removeprefix(":").strip().removesuffix(".")
    return float(len(tail) <= MAX_ANSWER_CHARS and _NUMBER_TOKEN.fullmatch(tail) is not None)


# ----------------------------------------------------------------------------------------------------------------
# Accuracy scorers: (extracted prediction, reference) -> score in [0, 1]

_YES = re.compile(r"(?<![a-z])(yes|true|correct)(?![a-z])")
_NO = re.compile(r"(?<![a-z])(no|false|incorrect)(?![a-z])")


def yesno_label(pred: str) -> str | None:
    """ "yes", "no" or None (unknown, or both yes- and no-words: ambiguous).

    Curr-ReFT stage 1 lowercases and tries `(?<![a-z])(yes|true|correct)(?![a-z])`, then `(no|false|incorrect)`. The
    lookbehind keeps "incorrect" from matching "correct". Departures: the no-words get the same boundaries (else
    "nothing" or "know" read as "no"), and a text with both kinds ("yes and no") is ambiguous, not "yes".
    """
    text = pred.lower()
    has_yes, has_no = bool(_YES.search(text)), bool(_NO.search(text))
    if has_yes == has_no:
        return None
    return "yes" if has_yes else "no"


def yesno_score(pred: str, gt: str) -> float:
    """1.0 iff `yesno_label(pred)` equals the canonical "yes"/"no" answer."""
    label = yesno_label(pred)
    return float(label is not None and label == gt.strip().lower().rstrip("."))


_LETTER = re.compile(r"(?<![A-Za-z0-9_])([A-J])(?![A-Za-z0-9_])")


def choice_letters(text: str) -> list[str]:
    """Ordered, deduplicated standalone option letters A-J (Curr-ReFT's `get_final_answer`, which uses A-E).

    "A", "(B)", "B.", "A, C" count; the A of "Answer" and the lowercase article "a" do not. A text that is nothing
    but one lowercase letter ("b", "(c).") counts as that letter. Caveat: a standalone capital "I" counts as option I.
    """
    letters = list(dict.fromkeys(_LETTER.findall(text)))
    if not letters:
        bare = text.strip().strip("().:*[] ")
        if len(bare) == 1 and bare in "abcdefghij":
            letters = [bare.upper()]
    return letters


def choice_score(pred: str, gt: str, partial_credit: float = 0.0) -> float:
    """Set match of option letters: equal sets → 1; no overlap or empty prediction → 0; partial overlap →
    `partial_credit`. Curr-ReFT's released stage 2 has no partial credit (0.0, the default); its experimental
    `calculate_list_hard_reward` gives 0.2. Sets, so "C, A" matches "A,C" (Curr-ReFT compares ordered strings)."""
    predicted, expected = set(choice_letters(pred)), set(choice_letters(gt))
    if not predicted or not expected or not predicted & expected:
        return 0.0
    return 1.0 if predicted == expected else float(partial_credit)


_NUMBER_TOKEN = re.compile(r"(?<![\w.])[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?(?!\d)")
_FRACTION = re.compile(
    r"\\d?frac\{\s*([+-]?\d+(?:\.\d+)?)\s*\}\{\s*([+-]?\d+(?:\.\d+)?)\s*\}|"
    r"([+-]?\d+(?:\.\d+)?)\s*/\s*([+-]?\d+(?:\.\d+)?)"
)


def parse_single_number(text: str) -> float | None:
    """The one number in `text` ("1,000" = 1000; words around it allowed); None if there is none or several
    distinct values ("3 or 4": no hedging)."""
    values = {float(token.replace(",", "")) for token in _NUMBER_TOKEN.findall(text)}
    if len(values) != 1:
        return None
    (value,) = values
    return value if math.isfinite(value) else None


def number_score(pred: str, gt: str, rel_tol: float = 0.0, abs_tol: float = 0.0) -> float:
    """1.0 iff the prediction holds exactly one number and it is `math.isclose(.., rel_tol, abs_tol)` to the answer.

    Tolerance 0 is exact: DyME trains with relative tolerance 0 (`eval_one_chart(.., 0)`); ChartQA evaluation uses
    rel_tol=0.05. A reference that is not a number is compared as a string (`string_score`).
    """
    expected = parse_single_number(gt)
    if expected is None:
        return string_score(pred, gt)
    value = parse_single_number(pred)
    return float(value is not None and math.isclose(value, expected, rel_tol=rel_tol, abs_tol=abs_tol))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EDGE_PUNCTUATION = " \t\n\"'`.,;:!?()[]{}*_"


def normalize_text(text: str) -> str:
    """Lowercase, drop the articles a/an/the, collapse whitespace, strip surrounding punctuation."""
    text = _ARTICLES.sub(" ", text.lower())
    return " ".join(text.split()).strip(_EDGE_PUNCTUATION)


def string_score(pred: str, gt: str) -> float:
    """Normalised exact match (`normalize_text`); an empty prediction scores 0."""
    predicted = normalize_text(pred)
    return float(bool(predicted) and predicted == normalize_text(gt))


MATH_VERIFY_MISSING = (
    "math-verify cannot be imported ({error}); it scores math answers: pip install math-verify (a jaxvlm dependency), "
    "or pass use_math_verify=False (in the accuracy reward's kwargs) to score them as numbers and exact strings only"
)


def require_math_verify():
    """The `math_verify` module; MissingDependencyError saying how to install it when it cannot be imported."""
    try:
        import math_verify
    except ImportError as error:
        raise MissingDependencyError(MATH_VERIFY_MISSING.format(error=error), name="math_verify") from error
    return math_verify


def math_verify_available() -> bool:
    """Whether `math_verify` imports (`require_math_verify` raises the error saying how to install it)."""
    try:
        require_math_verify()
    except MissingDependencyError:
        return False
    return True


def _latex_wrapped(text: str) -> str:
    """`$text$` unless the text already has math delimiters or \\boxed: math-verify then parses the whole answer as
    one expression ("3 or 5" becomes the set {3, 5}, not its last number)."""
    return text if re.search(r"\$|\\boxed|\\\(|\\\[", text) else f"${text}$"


def _unwrap_math(text: str) -> str:
    """`text` without surrounding `$`, `\\boxed{...}`, whitespace and a trailing '.'."""
    text = text.strip().strip("$").strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", text)
    return (boxed.group(1) if boxed else text).strip().rstrip(".")


def _simple_number(text: str) -> float | None:
    """A plain number, `a/b` or `\\frac{a}{b}` (the math fallback's numbers), else None."""
    text = _unwrap_math(text)
    fraction = _FRACTION.fullmatch(text)
    if fraction:
        parts = fraction.group(1, 2) if fraction.group(1) else fraction.group(3, 4)
        numerator, denominator = float(parts[0]), float(parts[1])
        return numerator / denominator if denominator else None
    return parse_single_number(text) if _NUMBER_TOKEN.fullmatch(text.replace(" ", "")) else None


def _math_string(text: str) -> str:
    return re.sub(r"\s+", "", _unwrap_math(text)).lower()


# Math pre-check (`math_input_problem`): what math-verify never sees.
MAX_MATH_CHARS = 512
MAX_MATH_NESTING = 6  # brackets {, (, [ open at once
MAX_POWER_TOWER = 2  # carets in one tower: a^{b^{c}} has 2
MAX_EXPONENT_DIGITS = 5  # an integer exponent of at most 99,999
MAX_FACTORIAL_DIGITS = 4  # n! for n of at most 9,999
MAX_FACTORIALS = 8

_OPENERS, _CLOSERS = "{([", "})]"


def _bracket_partners(text: str) -> tuple[dict[int, int], int]:
    """{index of an opening bracket: index of its closing one} (unmatched ones left out), and the deepest nesting."""
    partners: dict[int, int] = {}
    stack: list[int] = []
    deepest = 0
    for i, char in enumerate(text):
        if char in _OPENERS:
            stack.append(i)
            deepest = max(deepest, len(stack))
        elif char in _CLOSERS and stack:
            partners[stack.pop()] = i
    return partners, deepest


def _token_end(text: str, start: int, partners: Mapping[int, int]) -> int:
    """End (exclusive) of the operand starting at `start`: a bracket group, a `\\command`, a run of digits (math-verify
    may read `10^10` as 10**10) or one character."""
    if start >= len(text):
        return start
    if start in partners:
        return partners[start] + 1
    if text[start] == "\\":
        end = start + 1
        while end < len(text) and text[end].isalpha():
            end += 1
        return max(end, start + 2)
    if text[start].isdigit():
        end = start
        while end < len(text) and (text[end].isdigit() or text[end] == "."):
            end += 1
        return end
    return start + 1


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _power_problem(text: str, partners: Mapping[int, int]) -> str | None:
    """A power tower of more than MAX_POWER_TOWER carets (nested exponents or an unbraced chain a^b^c), a nested power
    of numbers only (10^{10^{10}}), or an integer exponent over MAX_EXPONENT_DIGITS digits; None otherwise. Carets
    are at most len(text) / 2 (the text is capped first), so the quadratic scan below is bounded."""
    carets = [i for i, char in enumerate(text) if char == "^"]
    openers = {close: open_ for open_, close in partners.items()}
    height: dict[int, int] = {}
    for caret in reversed(carets):
        start = _skip_spaces(text, caret + 1)
        end = _token_end(text, start, partners)
        exponent = text[start:end].strip("{}() ")
        if exponent.isdigit() and len(exponent) > MAX_EXPONENT_DIGITS:
            return f"an integer exponent of more than {MAX_EXPONENT_DIGITS} digits"
        inner = [height[c] for c in carets if start <= c < end]
        chained = _skip_spaces(text, end)
        if chained < len(text) and text[chained] == "^":
            inner.append(height[chained])
        height[caret] = 1 + max(inner, default=0)
        if height[caret] > MAX_POWER_TOWER:
            return f"a power tower of more than {MAX_POWER_TOWER} carets"
        base = _base_group(text, caret, openers)
        if (inner or "^" in base) and not re.search(r"[A-Za-z]", exponent + base):
            return "a nested power of numbers only"
    return None


def _base_group(text: str, caret: int, openers: Mapping[int, int]) -> str:
    """The bracket group right before a caret ("(10^{9})" in "(10^{9})^{9}"; `openers` maps each matched closing
    bracket to its opening one), or "" when the base is not one."""
    end = caret
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return text[openers[end - 1] : end] if end > 0 and (end - 1) in openers else ""


def _factorial_problem(text: str, partners: Mapping[int, int]) -> str | None:
    """More than MAX_FACTORIALS factorials, a factorial of an integer over MAX_FACTORIAL_DIGITS digits, or of a
    bracket group holding a factorial or a power ((9!)!, {10^{10}}!); None otherwise. `\\!` (a TeX space) and `!=` are
    not factorials."""
    closer_to_opener = {close: open_ for open_, close in partners.items()}
    bangs = [
        i
        for i, char in enumerate(text)
        if char == "!" and (i == 0 or text[i - 1] != "\\") and not text.startswith("!=", i)
    ]
    if len(bangs) > MAX_FACTORIALS:
        return f"more than {MAX_FACTORIALS} factorials"
    for bang in bangs:
        end = bang
        while end > 0 and text[end - 1].isspace():
            end -= 1
        start = end
        while start > 0 and text[start - 1].isdigit():
            start -= 1
        if end - start > MAX_FACTORIAL_DIGITS:
            return f"a factorial of an integer of more than {MAX_FACTORIAL_DIGITS} digits"
        if start == end and end > 0 and (end - 1) in closer_to_opener:
            group = text[closer_to_opener[end - 1] : end]
            if "!" in group or "^" in group:
                return "a factorial of a factorial or of a power"
    return None


_BINOMIAL = re.compile(r"\\[dt]?binom|\\choose")
_LONG_INTEGER = re.compile(rf"\d{{{MAX_FACTORIAL_DIGITS + 1}}}")


def math_input_problem(text: str, max_chars: int = MAX_MATH_CHARS) -> str | None:
    """Why `text` must not reach math-verify (whose SymPy evaluation of `10^{10^{10}}` or `9^{9^{9}}` runs for
    minutes, and whose parser slows down sharply on deep nesting), or None when it may: over `max_chars` characters,
    brackets nested deeper than MAX_MATH_NESTING, `_power_problem` / `_factorial_problem`, or a binomial alongside a
    power or an integer over MAX_FACTORIAL_DIGITS digits (`\\binom{10^{9}}{10^{5}}`). Length checked first; the rest
    is quadratic at worst in a text of at most `max_chars`."""
    if len(text) > max_chars:
        return f"over {max_chars} characters"
    partners, deepest = _bracket_partners(text)
    if deepest > MAX_MATH_NESTING:
        return f"brackets nested deeper than {MAX_MATH_NESTING}"
    if _BINOMIAL.search(text) and ("^" in text or _LONG_INTEGER.search(text)):
        return "a binomial of a power or of a long integer"
    return _power_problem(text, partners) or _factorial_problem(text, partners)


# The math-verify worker: a child process (`python -c`, not multiprocessing, so no re-import of the caller's
# __main__ and no restriction on daemonic callers) speaking JSON lines on a pipe.
MATH_TIME_BUDGET_S = 1.0
MATH_WORKER_START_S = 300.0  # importing SymPy on a loaded machine; not part of any completion's budget
MATH_OUTCOME_CACHE = 4096  # (gold, prediction, budget) outcomes kept: a group's G rollouts often repeat an answer
_WORKER_BOOT = "from jaxvlm.rewards import _math_worker_main; _math_worker_main()"


def math_wall_limit_s(budget_s: float) -> float:
    """Wall seconds the caller waits for the worker's answer before it kills the worker: 4 x budget + 2 s, so a
    loaded machine does not cut a computation the CPU-time timer would let finish."""
    return 4.0 * budget_s + 2.0


class _OverBudget(BaseException):
    """Raised in the worker by the CPU-time timer. A BaseException: math-verify's `except Exception` must not eat it."""


def _math_worker_main() -> None:
    """The worker's loop: read `[gold, prediction, budget_s]` lines from stdin, answer one JSON line each on the
    original stdout (`["equal" | "different" | "no_gold" | "timeout", cumulative CPU seconds]`) — anything the
    libraries print goes to stderr. The budget is ITIMER_PROF (this process's CPU time), re-fired every 50 ms until
    disarmed in case a library's bare `except:` swallows one `_OverBudget`."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller; it closes our stdin
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": the budget is ours
    import math_verify

    armed = False

    def over_budget(signum, frame):
        if armed:
            raise _OverBudget

    signal.signal(signal.SIGPROF, over_budget)
    _verify_outcome(math_verify, "$\\frac{1}{2}$", "0.5")  # lazy set-up (the LaTeX grammar) outside any budget
    replies.write(json.dumps(["ready", time.process_time()]) + "\n")
    replies.flush()
    for line in sys.stdin:
        gold, prediction, budget_s = json.loads(line)
        try:
            armed = True
            signal.setitimer(signal.ITIMER_PROF, budget_s, 0.05)
            outcome = _verify_outcome(math_verify, gold, prediction)
            signal.setitimer(signal.ITIMER_PROF, 0)
            armed = False
        except _OverBudget:
            signal.setitimer(signal.ITIMER_PROF, 0)
            armed = False
            outcome = "timeout"
        replies.write(json.dumps([outcome, time.process_time()]) + "\n")
        replies.flush()


def _verify_outcome(math_verify, gold_text: str, prediction_text: str) -> str:
    """math-verify's `verify(parse(gold), parse(prediction))` (gold first, as its API asks; its own signal timeouts
    off, the worker's budget covers both parses and the comparison)."""
    gold = math_verify.parse(gold_text, parsing_timeout=None)
    if not gold:
        return "no_gold"
    predicted = math_verify.parse(prediction_text, parsing_timeout=None)
    verified = bool(predicted) and math_verify.verify(gold, predicted, timeout_seconds=None)
    return "equal" if verified else "different"


class MathVerifyWorker:
    """The math-verify worker process: started on first use, reused, killed when it does not answer within
    `math_wall_limit_s(budget)` and started again on the next use. One call at a time (a lock): callers on several
    threads take turns. A copy inherited by a forked process starts its own worker. The worker's answers (over-budget
    ones included, not a kill at the wall limit, which depends on the machine's load) are kept for the last
    MATH_OUTCOME_CACHE questions: a repeated degenerate answer costs its budget once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: collections.OrderedDict[tuple[str, str, float], str] = collections.OrderedDict()
        self._process: subprocess.Popen | None = None
        self._owner_pid = 0
        self._pending = b""
        self._live_cpu_s = 0.0  # CPU seconds the live worker reported (a finished one counts in os.times())
        self.kills = 0  # workers killed: no answer within the wall limit, or alive at `close`

    @property
    def pid(self) -> int | None:
        """The live worker's process id (None before the first use and after a kill)."""
        return None if self._process is None else self._process.pid

    def cpu_seconds(self) -> float:
        """CPU seconds the live worker has used (its start-up included). A finished worker's time is in
        `os.times().children_user/children_system` of this process once it has been waited for."""
        return self._live_cpu_s

    def verify(self, gold: str, prediction: str, budget_s: float, wall_limit_s: float | None = None) -> str:
        """The outcome: "equal", "different", "no_gold" (math-verify cannot parse the gold) or "timeout" (over the CPU
        budget, no answer within the wall limit, or the worker died)."""
        wall_limit_s = math_wall_limit_s(budget_s) if wall_limit_s is None else wall_limit_s
        question = (gold, prediction, float(budget_s))
        with self._lock:
            if question in self._outcomes:
                self._outcomes.move_to_end(question)
                return self._outcomes[question]
            process = self._started()
            try:
                process.stdin.write((json.dumps([gold, prediction, budget_s]) + "\n").encode())
                process.stdin.flush()
            except OSError:
                self._stop()
                return "timeout"
            reply = self._reply(process, time.monotonic() + wall_limit_s)
            if reply is None:
                self._stop()
                return "timeout"
            outcome, self._live_cpu_s = reply
            self._outcomes[question] = outcome
            if len(self._outcomes) > MATH_OUTCOME_CACHE:
                self._outcomes.popitem(last=False)
            return outcome

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _started(self) -> subprocess.Popen:
        if self._process is not None and self._owner_pid == os.getpid() and self._process.poll() is None:
            return self._process
        if self._process is not None and self._owner_pid == os.getpid():
            self._stop()
        self._process, self._owner_pid, self._pending = None, os.getpid(), b""
        path = os.pathsep.join(entry for entry in sys.path if entry)
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0
        )
        ready = self._reply(process, time.monotonic() + MATH_WORKER_START_S)
        if ready is None or ready[0] != "ready":
            process.kill()
            process.wait()
            raise RuntimeError(
                f"the math-verify worker ({sys.executable} -c {_WORKER_BOOT!r}) did not start within "
                f"{MATH_WORKER_START_S:.0f} s (its errors are on stderr)"
            )
        self._process, self._live_cpu_s = process, ready[1]
        return process

    def _reply(self, process: subprocess.Popen, deadline: float) -> list | None:
        """The worker's next JSON line, or None when it sends none before `deadline` (time.monotonic()) or exits."""
        fd = process.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def _stop(self) -> None:
        process, self._process, self._pending, self._live_cpu_s = self._process, None, b"", 0.0
        if process is None or self._owner_pid != os.getpid():
            return
        if process.poll() is None:
            process.kill()
            self.kills += 1
        process.wait()
        for stream in (process.stdin, process.stdout):
            stream.close()


MATH_WORKER = MathVerifyWorker()
atexit.register(MATH_WORKER.close)

_budget_events = threading.local()  # per thread: predictions over the math time budget so far (compute_rewards)


def timeouts_so_far() -> int:
    """Predictions this thread has seen go over the math time budget (`compute_rewards` counts them per reward)."""
    return getattr(_budget_events, "timeouts", 0)


def _record_timeout(budget_s: float, prediction: str) -> None:
    _budget_events.timeouts = timeouts_so_far() + 1
    if "timeout" not in _warned:
        _warned.add("timeout")
        logger.warning(
            "math-verify went over its time budget (%.3g s of CPU) on a prediction of %d characters; scored as "
            "unverified (further ones are only counted in rewards/<name>/timeouts)",
            budget_s,
            len(prediction),
        )


def math_score(pred: str, gt: str, *, use_math_verify: bool = True, time_budget_s: float = MATH_TIME_BUDGET_S) -> float:
    """Math answer check. Never substring containment, never option letters unless the reference is a letter.

    With math-verify (the default; MissingDependencyError when it cannot be imported, never a silent substitute):
    `verify(parse(gold), parse(prediction))`, gold first as its API asks (R1-V's reward code passes them the other way
    round), both wrapped in `$...$` when they have no math delimiters, or an exact match after normalisation. It runs
    in the worker process (`MathVerifyWorker`) under `time_budget_s` seconds of CPU, on any thread; a prediction over
    the budget, or one `math_input_problem` rejects, scores by the exact match alone (a timeout is counted:
    `timeouts_so_far`). A reference math-verify cannot parse, or one `math_input_problem` rejects, is scored by the
    path below. With `use_math_verify=False`: both sides as numbers (plain, `a/b`, `\\frac{a}{b}`, `\\boxed`), else
    exact match after removing `$`, `\\boxed{}`, whitespace, case and a trailing '.'.
    Curr-ReFT's stage-3 bug gave `<answer>7</answer>` vs "5" (and "" or "1" vs "12") a reward of 1; all score 0 here.
    """
    if not pred.strip():
        return 0.0
    if use_math_verify:
        require_math_verify()
        if math_input_problem(gt) is None:
            exact = _math_string(pred) == _math_string(gt)
            if math_input_problem(pred) is not None:
                return float(exact)
            outcome = MATH_WORKER.verify(_latex_wrapped(gt), _latex_wrapped(pred), time_budget_s)
            if outcome == "timeout":
                _record_timeout(time_budget_s, pred)
            if outcome != "no_gold":
                return float(outcome == "equal" or exact)
    expected, value = _simple_number(gt), _simple_number(pred)
    if expected is not None:
        return float(value is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12))
    return float(bool(_math_string(pred)) and _math_string(pred) == _math_string(gt))


def iou(box_a: Sequence[float], box_b: Sequence[float], inclusive: bool = False) -> float:
    """IoU of two pixel boxes [x1, y1, x2, y2]; 0 when the union has no area.

    Plain area formula by default. `inclusive=True` is Curr-ReFT's inclusive-pixel formula: widths and heights
    are x2 - x1 + 1 (a box covers the pixels x1..x2 inclusive).
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    pad = 1.0 if inclusive else 0.0
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1) + pad) * max(0.0, min(ay2, by2) - max(ay1, by1) + pad)
    union = (ax2 - ax1 + pad) * (ay2 - ay1 + pad) + (bx2 - bx1 + pad) * (by2 - by1 + pad) - inter
    return inter / union if union > 0 else 0.0


def parse_boxes(text: str) -> list[list[float]]:
    """Every `[x1, y1, x2, y2]` list of 4 numbers in `text`."""
    return [[float(v) for v in match] for match in _BOX.findall(text)]


def _reference_box(example: Mapping) -> list[float]:
    box = list(example.get("bbox") or [])
    if not box:
        boxes = parse_boxes(str(example.get("answer", "")))
        box = boxes[0] if len(boxes) == 1 else []
    if len(box) != 4:
        raise ValueError(f"example {example.get('id', '')!r} has no reference box")
    return [float(v) for v in box]


def iou_score(pred: str, example: Mapping, threshold: float | None = None, *, inclusive: bool = False) -> float:
    """IoU of the one box in `pred` with the example's `bbox` (or the box in its `answer`).

    Exactly one box is required: none or several score 0, so listing many boxes cannot game the reward (Curr-ReFT
    reads the first). A box with x2 < x1 or y2 < y1 scores 0. With `threshold`, Curr-ReFT's rule: 1.0 iff IoU >
    threshold (strictly; IoU exactly 0.5 gives 0 at threshold 0.5).
    """
    boxes = parse_boxes(pred)
    if len(boxes) != 1:
        return 0.0
    (box,) = boxes
    if box[2] < box[0] or box[3] < box[1]:
        return 0.0
    value = iou(box, _reference_box(example), inclusive=inclusive)
    return value if threshold is None else float(value > threshold)


def label_set(text: str) -> set[str]:
    """Lowercased labels: `ast.literal_eval` of a list when the text holds '[' ... ']' (at most MAX_LITERAL_CHARS
    characters from the first '[' to the last ']'), else split on `[,，、\\s]+` (Curr-ReFT's rule; a multi-word label
    becomes several words, on both sides alike). Surrounding punctuation is stripped."""
    items = [text]
    first, last = text.find("["), text.rfind("]")
    if 0 <= first < last and last - first < MAX_LITERAL_CHARS:
        try:
            parsed = ast.literal_eval(text[first : last + 1])
            if isinstance(parsed, (list, tuple)):
                items = [str(x) for x in parsed]
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            pass
    labels = (part.strip(_EDGE_PUNCTUATION).lower() for item in items for part in re.split(r"[,，、\s]+", item))
    return {label for label in labels if label}


def jaccard_score(pred: str, gt: str) -> float:
    """|P ∩ G| / |P ∪ G| of the label sets (Curr-ReFT stage-3 classification); an empty prediction scores 0."""
    predicted, expected = label_set(pred), label_set(gt)
    if not predicted or not expected:
        return 0.0
    return len(predicted & expected) / len(predicted | expected)


# ----------------------------------------------------------------------------------------------------------------
# DyME thinking reward without spaCy

STOPWORDS = frozenset(
    """
a about above across after afterwards again against all almost along already also although always am among an and
another any anyone anything are around as at be because been before being below beside besides between beyond both
but by can cannot could did do does doing done down during each either else enough etc even ever every everything
few for from further had has have having he hence her here hers herself him himself his how however i if in indeed
into is it its itself just least less let lets like may me might more moreover most mostly much must my myself
neither never nevertheless no none nor not nothing now of off often on once only onto or other others otherwise our
ours ourselves out over own per perhaps quite rather really same shall she should since so some something somewhat
still such than that the their theirs them themselves then there thereby therefore these they this those though
through throughout thus to together too toward towards under unless until up upon us very via was we well were what
whatever when whenever where whereas wherever whether which while who whom whose why will with within without would
yet you your yours yourself yourselves s t d ll m re ve
""".split()
)
_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
_DOUBLED = set("bdgmnprt")


def lemma(word: str) -> str:
    """A small deterministic lemmatiser (both sides of the F1 go through it, so consistency matters more than
    linguistics): plural -ies/-es/-s, then -ing/-ed when a stem of >= 3 letters with a vowel remains (doubled final
    consonant undone: running → run), then a final -e is dropped (make/making/makes → mak)."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith(("ies", "ied")) and len(word) > 4:
        stem = word[:-3] + "y"
    else:
        stem = word
        if stem.endswith(("sses", "shes", "ches", "xes", "zes")):
            stem = stem[:-2]
        elif stem.endswith("s") and not stem.endswith(("ss", "us", "is")):
            stem = stem[:-1]
        for suffix in ("ing", "ed"):
            if stem.endswith(suffix) and not stem.endswith("eed"):
                base = stem[: -len(suffix)]
                if len(base) >= 3 and re.search(r"[aeiouy]", base):
                    undouble = len(base) >= 4 and base[-1] == base[-2] and base[-1] in _DOUBLED
                    stem = base[:-1] if undouble else base
                break
    return stem[:-1] if len(stem) > 3 and stem.endswith("e") else stem


def content_lemmas(text: str) -> set[str]:
    """Lemmas of the non-stopword tokens (`[a-z]+` words and numbers) of the lowercased text."""
    return {lemma(token) for token in _WORD.findall(text.lower()) if token not in STOPWORDS}


def think_f1(thinking: str, reference: str) -> float:
    """DyME's local thinking reward: F1 = 2PR/(P+R) between the content-lemma sets of `thinking` and `reference`;
    0 when either set is empty.

    DyME (`RewardCalculatorLocal`) keeps spaCy `en_core_web_sm` lemmas of NOUN/PROPN/VERB/ADJ/NUM tokens that are not
    stop words, and adds 1e-6 to the P and R denominators. We have no spaCy: a built-in stopword list (which also
    holds common adverbs/pronouns spaCy's POS filter would drop) and the rule lemmatiser `lemma` stand in, and F1 is
    exact (identical texts give 1.0).
    """
    predicted, expected = content_lemmas(thinking), content_lemmas(reference)
    common = len(predicted & expected)
    if not predicted or not expected or not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------
# Registered answer rewards

_DYME_NORMALISED_TYPES = ("yesno", "number", "string", "labels")


def _accuracy_startup_check(kwargs: Mapping[str, Any]) -> None:
    """Any example may be a math one: the accuracy reward needs math-verify unless told not to use it."""
    if kwargs.get("use_math_verify", True):
        require_math_verify()


@register("accuracy", startup_check=_accuracy_startup_check)
def accuracy(
    completion: str,
    example: Mapping,
    *,
    extract: str = "tags",
    partial_credit: float = 0.0,
    rel_tol: float = 0.0,
    abs_tol: float = 0.0,
    iou_threshold: float | None = 0.5,
    inclusive_iou: bool = False,
    use_math_verify: bool = True,
    math_time_budget_s: float = MATH_TIME_BUDGET_S,
    max_completion_chars: int = MAX_COMPLETION_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> float:
    """Answer correctness, dispatched on `example["answer_type"]`:

    yesno → yesno_score, choice/multi_choice → choice_score(partial_credit), number → number_score(rel_tol, abs_tol),
    math → math_score(use_math_verify), string → string_score, bbox → iou_score(iou_threshold; None = continuous IoU,
    inclusive_iou), labels → jaccard_score. The prediction comes from `extract_answer(completion, extract)`; none → 0.
    With extract="dyme" the prediction of yes/no, number, string and labels answers gets DyME's normalisation
    (lowercase, trailing '.' stripped) first. A completion over `max_completion_chars`, or an extracted answer over
    `max_answer_chars` (not with extract="raw"), scores 0; a math answer gets `math_time_budget_s` CPU seconds of
    math-verify (module docstring: bounded in time).
    """
    pred = extract_answer(completion, extract)  # linear; raises on an unknown style whatever the length
    if pred is None or _over_caps(completion, pred, extract, max_completion_chars, max_answer_chars):
        return 0.0
    answer_type, gt = example.get("answer_type", "string"), str(example["answer"])
    if extract == "dyme" and answer_type in _DYME_NORMALISED_TYPES:
        pred = pred.lower().strip().rstrip(".")
    if answer_type == "yesno":
        return yesno_score(pred, gt)
    if answer_type in ("choice", "multi_choice"):
        return choice_score(pred, gt, partial_credit)
    if answer_type == "number":
        return number_score(pred, gt, rel_tol=rel_tol, abs_tol=abs_tol)
    if answer_type == "math":
        return math_score(pred, gt, use_math_verify=use_math_verify, time_budget_s=math_time_budget_s)
    if answer_type == "string":
        return string_score(pred, gt)
    if answer_type == "bbox":
        return iou_score(pred, example, iou_threshold, inclusive=inclusive_iou)
    if answer_type == "labels":
        return jaccard_score(pred, gt)
    raise ValueError(f"unknown answer_type {answer_type!r}")


@register("iou")
def iou_reward(
    completion: str,
    example: Mapping,
    *,
    extract: str = "tags",
    inclusive: bool = False,
    max_completion_chars: int = MAX_COMPLETION_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> float:
    """Continuous IoU of the one predicted box with the example's box (no threshold).

    An example without a box (answer_type other than "bbox" and no `bbox` field, e.g. a classification row in a
    mixed detection / classification stage) is not scored by this reward: 0, whatever the completion says. The
    length caps are accuracy's.
    """
    if example.get("answer_type") != "bbox" and not example.get("bbox"):
        return 0.0
    pred = extract_answer(completion, extract)  # linear; raises on an unknown style whatever the length
    if pred is None or _over_caps(completion, pred, extract, max_completion_chars, max_answer_chars):
        return 0.0
    return iou_score(pred, example, None, inclusive=inclusive)


@register("think_f1")
def think_f1_reward(
    completion: str, example: Mapping, *, extract: str = "dyme", max_completion_chars: int = MAX_COMPLETION_CHARS
) -> float:
    """DyME's thinking reward: `think_f1` of the thinking against `example["reasoning"]`. The thinking is the text
    before the first "answer:" (extract="dyme"), the single `<think>` block (extract="tags"; none → 0), or the text
    before the final answer (extract="boxed" / "last_number": `thinking_text`). A completion over
    `max_completion_chars` scores 0."""
    if extract not in THINKING_STYLES:  # first, whatever the completion
        raise ValueError(f"think_f1: extract must be one of {THINKING_STYLES}, got {extract!r}")
    if len(completion) > max_completion_chars:
        return 0.0
    thinking = thinking_text(completion, extract)
    if not thinking:
        return 0.0
    return think_f1(thinking, str(example.get("reasoning", "")))


def _soft_overlong_startup_check(kwargs: Mapping[str, Any]) -> None:
    """L_max a positive integer, L_cache an integer in [0, L_max] (a bad value would fail on every sample)."""
    max_len, cache = kwargs.get("max_completion_len"), kwargs.get("soft_punish_cache")
    problem = checks.integer(1)(max_len)
    if problem is not None:
        raise ValueError(f"soft_overlong: max_completion_len (tokens) {problem}")
    problem = checks.integer(0, max_len)(cache)
    if problem is not None:
        raise ValueError(f"soft_overlong: soft_punish_cache (tokens, at most max_completion_len) {problem}")


@register("soft_overlong", startup_check=_soft_overlong_startup_check)
def soft_overlong(
    completion: str, example: Mapping, *, completion_length: int, max_completion_len: int, soft_punish_cache: int
) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), as TRL 1.16 codes it
    (`trl.rewards.get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`), on |y| =
    `completion_length`, the completion's length in tokens (stop token included, as TRL's completion ids):

        0                                   if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
        -1                                  if |y| > L_max

    L_max = `max_completion_len` (default: the stage's `sampling.max_new_tokens`, the longest completion the sampler
    writes; a smaller value is allowed), L_cache = `soft_punish_cache` (required; 0 is a hard -1 above L_max). The
    penalty only punishes: it never rewards a short completion. verl's overlong buffer is the same ramp with L_max
    its max_response_length and a `penalty_factor` scale (here the reward entry's `weight`)."""
    del completion, example
    limit = max_completion_len - soft_punish_cache
    if completion_length <= limit:
        return 0.0
    if completion_length <= max_completion_len:
        return (limit - completion_length) / soft_punish_cache
    return -1.0


# ----------------------------------------------------------------------------------------------------------------
# Specs and the batched combiner


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward column: registered `name`, `weight` in the total, keyword arguments for the function."""

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _plain(value: Any) -> Any:
    """ml_collections ConfigDicts (not Mappings) as plain dicts."""
    return value.to_dict() if hasattr(value, "to_dict") and not isinstance(value, Mapping) else value


LENGTH_KWARG = "completion_length"  # a reward taking it is given the completion's token count (compute_rewards)
MAX_LENGTH_KWARG = "max_completion_len"  # a reward taking it defaults it to the stage's sampling.max_new_tokens


def takes_kwarg(name: str, kwarg: str) -> bool:
    """Whether the reward registered as `name` has the keyword parameter `kwarg`."""
    return kwarg in inspect.signature(REWARDS[name]).parameters


def _checked_spec(name: Any, weight: Any, kwargs: Any, entry: Any, max_new_tokens: int | None = None) -> RewardSpec:
    if not isinstance(name, str) or name not in REWARDS:
        known = ", ".join(sorted(REWARDS))
        raise ValueError(f"reward entry {entry!r}: unknown reward {name!r}; known rewards: {known}")
    try:
        weight = float("bool" if isinstance(weight, bool) else weight)
    except (TypeError, ValueError):
        raise ValueError(f"reward entry {entry!r}: weight must be a number, got {weight!r}") from None
    if not math.isfinite(weight):
        raise ValueError(f"reward entry {entry!r}: weight must be finite, got {weight}")
    kwargs = _plain(kwargs)
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"reward entry {entry!r}: kwargs must be a mapping, got {type(kwargs).__name__}")
    kwargs = _with_max_length(name, dict(kwargs), entry, max_new_tokens)
    lengths = {}
    if takes_kwarg(name, LENGTH_KWARG):
        if LENGTH_KWARG in kwargs:
            raise ValueError(
                f"reward entry {entry!r}: kwargs[{LENGTH_KWARG!r}] is each completion's token count, given by the "
                "sampler; remove it"
            )
        lengths = {LENGTH_KWARG: 0}
    try:
        inspect.signature(REWARDS[name]).bind("", {}, **kwargs, **lengths)
    except TypeError as error:
        raise ValueError(f"reward entry {entry!r}: bad kwargs for {name!r}: {error}") from None
    _check_limits(kwargs, entry)
    _check_extract(name, kwargs, entry)
    _run_startup_check(name, kwargs, entry)
    return RewardSpec(name, weight, dict(kwargs))


# The built-in rewards that read an `extract` kwarg, and the styles each accepts.
_EXTRACT_KWARG = {"accuracy": EXTRACT_STYLES, "iou": EXTRACT_STYLES, "think_f1": THINKING_STYLES}


def _check_extract(name: str, kwargs: Mapping[str, Any], entry: Any) -> None:
    """A built-in reward's `extract` is one of its styles: a misspelt one would otherwise fail on every sample (each
    scored 0 and counted as a failure) instead of stopping the run at start-up."""
    styles = _EXTRACT_KWARG.get(name)
    if styles is not None and "extract" in kwargs and kwargs["extract"] not in styles:
        raise ValueError(
            f"reward entry {entry!r}: kwargs['extract'] must be one of {styles}, got {kwargs['extract']!r}"
        )


def _check_limits(kwargs: Mapping[str, Any], entry: Any) -> None:
    """The time and length limits among a reward's kwargs: `max_*_chars` a positive integer, `math_time_budget_s` a
    positive finite number of seconds; ValueError naming the entry and the key otherwise."""
    for key, value in kwargs.items():
        if key.startswith("max_") and key.endswith("_chars"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"reward entry {entry!r}: kwargs[{key!r}] must be a positive integer, got {value!r}")
        elif key == "math_time_budget_s":
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ValueError(f"reward entry {entry!r}: kwargs[{key!r}] must be seconds > 0, got {value!r}")


def _with_max_length(name: str, kwargs: dict, entry: Any, max_new_tokens: int | None) -> dict:
    """A reward's `max_completion_len` from the stage's `sampling.max_new_tokens` when its entry leaves it unset; a
    given one above it is an error (no completion is longer, so the penalty's top would never be reached)."""
    if max_new_tokens is None or not takes_kwarg(name, MAX_LENGTH_KWARG):
        return kwargs
    given = kwargs.get(MAX_LENGTH_KWARG)
    if given is None:
        return {**kwargs, MAX_LENGTH_KWARG: int(max_new_tokens)}
    if checks.integer(1)(given) is None and given > max_new_tokens:
        raise ValueError(
            f"reward entry {entry!r}: kwargs[{MAX_LENGTH_KWARG!r}] = {given} is above the stage's "
            f"sampling.max_new_tokens = {max_new_tokens}, the longest completion sampled; leave it unset to use "
            f"{max_new_tokens}"
        )
    return kwargs


def _run_startup_check(name: str, kwargs: Mapping[str, Any], entry: Any) -> None:
    """The reward's `startup_check`, its MissingDependencyError or ValueError naming the entry."""
    check = STARTUP_CHECKS.get(name)
    if check is None:
        return
    try:
        check(kwargs)
    except MissingDependencyError as error:
        raise MissingDependencyError(f"reward entry {entry!r}: {error}", name=error.name) from error.__cause__
    except ValueError as error:  # a bad setting
        raise ValueError(f"reward entry {entry!r}: {error}") from None


def parse_reward_specs(value: Any, *, max_new_tokens: int | None = None) -> tuple[RewardSpec, ...]:
    """RewardSpecs from a config value: a sequence of RewardSpec, dicts `{"name", "weight"?, "kwargs"?}` or strings
    "name" / "name:weight"; a single such entry, or one string of comma-separated entries, also works. Unknown names,
    bad weights, unknown keys or kwargs the function does not take → ValueError naming the entry; a package a reward
    needs that cannot be imported (its `startup_check`) → MissingDependencyError (a ValueError) naming the entry.
    `max_new_tokens` (a stage's sampling.max_new_tokens): the default of a reward's `max_completion_len`, and its
    upper bound."""
    if value is None:
        return ()
    value = _plain(value)
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (RewardSpec, Mapping)):
        value = [value]
    specs = []
    for entry in value:
        entry = _plain(entry)
        if isinstance(entry, RewardSpec):
            specs.append(_checked_spec(entry.name, entry.weight, entry.kwargs, entry, max_new_tokens))
        elif isinstance(entry, str):
            name, _, weight = entry.strip().partition(":")
            specs.append(_checked_spec(name.strip(), weight.strip() if weight else 1.0, {}, entry, max_new_tokens))
        elif isinstance(entry, Mapping):
            unknown = set(entry) - {"name", "weight", "kwargs"}
            if unknown:
                raise ValueError(f"reward entry {entry!r}: unknown keys {sorted(unknown)} (use name, weight, kwargs)")
            kwargs = entry.get("kwargs") or {}
            specs.append(_checked_spec(entry.get("name"), entry.get("weight", 1.0), kwargs, entry, max_new_tokens))
        else:
            raise ValueError(f"reward entry {entry!r}: expected a RewardSpec, a dict or a 'name[:weight]' string")
    return tuple(specs)


def display_names(specs: Sequence[RewardSpec]) -> tuple[str, ...]:
    """Each spec's name, or `name#k` (k = 0, 1, ... in order) for every spec of a name that occurs more than once."""
    counts, seen, names = collections.Counter(spec.name for spec in specs), collections.Counter(), []
    for spec in specs:
        names.append(spec.name if counts[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}")
        seen[spec.name] += 1
    return tuple(names)


@dataclasses.dataclass
class RewardResult:
    """What `compute_rewards` returns."""

    per_reward: np.ndarray  # float32 [N, R], unweighted values per reward spec
    total: np.ndarray  # float32 [N], sum_r weight_r * per_reward[:, r]
    names: tuple[str, ...]  # R display names
    failures: dict[str, int]  # per display name: samples whose function raised or returned a non-finite value
    # per display name: samples whose math check went over its time budget (scored as unverified)
    timeouts: dict[str, int] = dataclasses.field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`rewards/<name>/mean`, `/std`, `/failures`, `/timeouts` per column and `rewards/total/mean`, `/std` (NaN
        when N = 0)."""

        def stats(column: np.ndarray) -> tuple[float, float]:
            return (float(column.mean()), float(column.std())) if column.size else (math.nan, math.nan)

        out: dict[str, float] = {}
        for r, name in enumerate(self.names):
            out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = stats(self.per_reward[:, r])
            out[f"rewards/{name}/failures"] = float(self.failures.get(name, 0))
            out[f"rewards/{name}/timeouts"] = float(self.timeouts.get(name, 0))
        out["rewards/total/mean"], out["rewards/total/std"] = stats(self.total)
        return out


_warned: set[str] = set()


def compute_rewards(
    specs: Any, completions: Sequence[str], examples: Sequence[Mapping], *, lengths: Sequence[int] | None = None
) -> RewardResult:
    """Score `completions[i]` against `examples[i]` with every spec (anything `parse_reward_specs` takes).

    `lengths[i]`: completion i's length in tokens (the sampler's `lengths`), given to the rewards that take
    `completion_length` (`LENGTH_KWARG`); such a reward without `lengths` is a ValueError before anything is scored.

    A function that raises, or returns something that is not a finite number, gives 0 for that sample and counts in
    `failures` (a warning is logged once per reward name per process); the batch always completes, unless the
    function lacks a package (MissingDependencyError, raised: zeros for every sample would be a silent substitute).
    A sample whose math check went over its time budget is counted in `timeouts` (its score is the reward's own).
    """
    specs = parse_reward_specs(specs)
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    if lengths is not None and len(lengths) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(lengths)} lengths")
    counted = [takes_kwarg(spec.name, LENGTH_KWARG) for spec in specs]
    if lengths is None and any(counted):
        needs = [spec.name for spec, c in zip(specs, counted) if c]
        raise ValueError(f"rewards {needs} score the completions' token counts: pass lengths=")
    names = display_names(specs)
    per_reward = np.zeros((len(completions), len(specs)), np.float32)
    failures, timeouts = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for r, (spec, name) in enumerate(zip(specs, names)):
        fn = REWARDS[spec.name]
        for i, (completion, example) in enumerate(zip(completions, examples)):
            timeouts_before = timeouts_so_far()
            extra = {LENGTH_KWARG: int(lengths[i])} if counted[r] else {}
            try:
                value = float(fn(completion, example, **spec.kwargs, **extra))
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except MissingDependencyError:
                raise
            except Exception as error:  # noqa: BLE001 - one bad sample must not stop the batch
                failures[name] += 1
                if spec.name not in _warned:
                    _warned.add(spec.name)
                    logger.warning(
                        "reward %r failed on example %r (scored 0; further failures are only counted): %s: %s",
                        spec.name,
                        example.get("id", i) if isinstance(example, Mapping) else i,
                        type(error).__name__,
                        error,
                    )
                continue
            finally:
                timeouts[name] += timeouts_so_far() > timeouts_before
            per_reward[i, r] = value
    weights = np.asarray([spec.weight for spec in specs], np.float32)
    total = (per_reward * weights).sum(axis=1, dtype=np.float32)
    return RewardResult(per_reward, total, names, failures, timeouts)
