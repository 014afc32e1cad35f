"""Fuzz: seeded generators of hostile completions (power towers, deep nesting, \\frac chains, long digit strings,
factorials, binomials, short random expressions that reach math-verify, tag soups, label lists, boxes, "answer:"
floods, unicode filler; up to ~1 MB) x every registered reward (and accuracy's other extraction styles), against
examples of every answer type (math in 40% of the cases), some with a hostile reference. Every call returns a
finite float in [0, 1] (rewards never raise) within a CPU-time bound; never a wall-clock threshold. Half of the
cases run in a threading.Thread (no signal-based timeouts there).

Small by default; `JAXVLM_FULL_TESTS=1` runs 1,000 cases. `python tests/test_fuzz_rewards.py [N]` prints a summary
(calls, timeouts, the slowest call in CPU and wall time).
"""

from __future__ import annotations

import math
import os
import random
import sys
import threading
import time

import pytest

from jaxvlm import rewards as R

N = 1000 if os.environ.get("JAXVLM_FULL_TESTS") == "1" else 16
# Per reward call: the math budget, plus the worker's answer and all parsing on the caller's side, with room to spare.
CPU_BOUND_S = 3 * R.MATH_TIME_BUDGET_S + 2.0
BUILTIN = [  # the text rewards (soft_overlong scores token counts: tests/test_overlong_reward.py)
    name for name in R.REWARDS if R.REWARDS[name].__module__ == R.__name__ and not R.takes_kwarg(name, R.LENGTH_KWARG)
]
SPECS = [R.RewardSpec(name) for name in BUILTIN] + [
    R.RewardSpec("accuracy", kwargs={"extract": "dyme"}),
    R.RewardSpec("accuracy", kwargs={"extract": "raw"}),
    R.RewardSpec("think_f1", kwargs={"extract": "tags"}),
]
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
WORDS = ("the", "cat", "yes", "no", "A", "(B)", "calm", "warm", "answer:", "Answer:", "5", "-3.5", "1,000", "\u3000")


def sized(rng: random.Random, small: int, large: int) -> int:
    """Mostly small counts, sometimes up to `large` (log-uniform above `small`)."""
    return rng.randint(1, small) if rng.random() < 0.6 else int(math.exp(rng.uniform(math.log(small), math.log(large))))


def power_tower(rng: random.Random) -> str:
    base = rng.choice(["9", "10", "2", "x", "e", "99999", "(10^{9})"])
    text = rng.choice(["9", "10", "x", "n", "99999"])
    for _ in range(sized(rng, 4, 2000)):
        text = f"{base}^{{{text}}}" if rng.random() < 0.7 else f"{base}^{text}"
    return text


def nesting(rng: random.Random) -> str:
    opening, closing = rng.choice([("{", "}"), ("(", ")"), ("[", "]"), ("\\left(", "\\right)"), ("\\sqrt{", "}")])
    depth = sized(rng, 8, 20000)
    inner = rng.choice(["1", "x", "\\frac{1}{2}", ""])
    return opening * depth + inner + (closing * depth if rng.random() < 0.8 else "")


def frac_chain(rng: random.Random) -> str:
    count = sized(rng, 10, 5000)
    if rng.random() < 0.5:
        return "\\frac{1}{" * count + "2" + "}" * count
    return "".join(rng.choice(["\\frac{1}{2}", "+", "\\cdot", "\\dfrac{3}{4}"]) for _ in range(count))


def digits(rng: random.Random) -> str:
    text = "".join(rng.choice("0123456789") for _ in range(min(sized(rng, 40, 300000), 2000)))
    return text * max(1, sized(rng, 2, 300000) // max(len(text), 1)) if rng.random() < 0.3 else text


def factorials(rng: random.Random) -> str:
    n = str(rng.choice([5, 9, 100, 9999, 10**5, 10**8]))
    form = rng.randrange(4)
    if form == 0:
        for _ in range(sized(rng, 3, 200)):
            n = f"({n})!"
        return n
    if form == 1:
        return f"{n}!" * sized(rng, 5, 5000)
    if form == 2:
        return f"{{10^{{{n}}}}}!"
    return n + "!" * sized(rng, 3, 5000)


def binomial(rng: random.Random) -> str:
    top, bottom = rng.choice(["10^{9}", "100000", "n", "5"]), rng.choice(["10^{5}", "3", "k", "99999"])
    return rng.choice(["\\binom", "\\dbinom", "\\tbinom"]) + f"{{{top}}}{{{bottom}}}"


def small_expression(rng: random.Random, depth: int = 0) -> str:
    """A short random LaTeX expression that mostly passes the math pre-check, so math-verify and its budget run."""
    if depth >= 3 or rng.random() < 0.3:
        return rng.choice(
            ["x", "y", "e", "\\pi", "2", "9", "10", "99999", "0.5", "-3", "n", str(rng.randint(0, 10**6))]
        )
    a, b = small_expression(rng, depth + 1), small_expression(rng, depth + 1)
    forms = [f"{a}+{b}", f"{a}-{b}", f"{a}\\cdot {b}", f"{a}^{{{b}}}", f"\\frac{{{a}}}{{{b}}}", f"\\sqrt{{{a}}}"]
    forms += [f"({a})!", f"{a}!", f"\\binom{{{a}}}{{{b}}}", f"\\sin({a})", f"\\log({a})", f"{a}={b}"]
    forms += [f"\\{{{a}, {b}\\}}", f"[{a}, {b})"]
    return rng.choice(forms)


def tag_soup(rng: random.Random) -> str:
    pieces = []
    for _ in range(sized(rng, 12, 60000)):
        pieces.append(rng.choice(TAGS) if rng.random() < 0.6 else rng.choice(WORDS))
    return "".join(pieces)


def label_list(rng: random.Random) -> str:
    labels = [rng.choice(["'calm'", "'warm'", '"sad"', "1", "calm", "'x' * 9", "[[[", "{'a': 1}"])]
    labels += [rng.choice(["'calm'", "'warm'", "2", "'happy'"]) for _ in range(sized(rng, 5, 40000))]
    text = "[" + ", ".join(labels)
    return text + ("]" if rng.random() < 0.8 else "")


def boxes(rng: random.Random) -> str:
    count = sized(rng, 2, 20000)
    longest = 60000 if count <= 2 else 6  # 60,000-digit coordinates in a few boxes, short ones in many
    number = lambda: rng.choice(["0", "10", "-3.5", ".5", "1" * rng.randint(1, longest), "1e400", "nan"])
    return " ".join(f"[{number()}, {number()}, {number()}, {number()}]" for _ in range(count))


def flags(rng: random.Random) -> str:
    return "".join(
        rng.choice(["answer: 5\n", "ANSWER:", "Answer:\n\n", "**5**\n"]) for _ in range(sized(rng, 3, 40000))
    )


def filler(rng: random.Random) -> str:
    alphabet = "abc xyz\n\t\u00a0\u2028\u3000，、$\\{}()^!_0123456789"
    return "".join(rng.choice(alphabet) for _ in range(sized(rng, 40, 300000)))


GENERATORS = (
    power_tower,
    nesting,
    frac_chain,
    digits,
    factorials,
    binomial,
    small_expression,
    small_expression,
    tag_soup,
    label_list,
    boxes,
    flags,
    filler,
)
REFERENCES = {
    "math": ["5", "\\frac{1}{2}", "x^2+1", "10^{10^{10}}", "(9!)!", "{" * 20 + "1" + "}" * 20, "\\sqrt{2}"],
    "yesno": ["yes", "no"],
    "multi_choice": ["A,C", "B"],
    "number": ["5", "1,000", "-3.5", "9" * 400],
    "string": ["red", "the cat"],
    "bbox": ["[0, 0, 10, 10]"],
    "labels": ["calm, warm", "[" + "'calm', " * 3000 + "]"],
}


def hostile_case(seed: int) -> tuple[str, dict]:
    """Completion (one or two generated pieces in a random frame) and an example of a random answer type."""
    rng = random.Random(seed)
    inner = "".join(rng.choice(GENERATORS)(rng) for _ in range(rng.choice([1, 1, 2])))
    frame = rng.randrange(5)
    if frame == 0:
        completion = f"<think>{filler(rng)[:2000]}</think><answer>{inner}</answer>"
    elif frame == 1:
        completion = f"{rng.choice(WORDS)} reasoning\nAnswer: {inner}"
    elif frame == 2:
        completion = inner
    elif frame == 3:
        completion = f"<think>{inner}</think>\n<answer>{rng.choice(['5', 'yes', 'A', 'calm'])}</answer>"
    else:
        completion = tag_soup(rng) + inner + tag_soup(rng)
    assert len(completion) < 2_000_000, f"seed {seed}: the generators' sizes went wrong ({len(completion)} chars)"
    answer_type = "math" if rng.random() < 0.4 else rng.choice(sorted(REFERENCES))
    answer = rng.choice(REFERENCES[answer_type])
    example = {
        "id": f"fuzz/{seed}",
        "question": "q?",
        "answer": answer,
        "answer_type": answer_type,
        "reasoning": rng.choice(["", "the cat sat on the mat", filler(rng)[:500]]),
        "bbox": [0.0, 0.0, 10.0, 10.0] if answer_type == "bbox" else [],
    }
    return completion, example


def cpu_seconds() -> float:
    """CPU time of this process, of its waited-for children (killed workers) and of the live math worker."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system + R.MATH_WORKER.cpu_seconds()


def score_case(seed: int) -> list[tuple[str, float, float, float]]:
    """(spec, value, CPU seconds, wall seconds) of every spec on the case; raises what a reward raises."""
    completion, example = hostile_case(seed)
    out = []
    for spec in SPECS:
        cpu, wall = cpu_seconds(), time.perf_counter()
        value = R.get_reward(spec.name)(completion, example, **spec.kwargs)
        out.append((f"{spec.name}{dict(spec.kwargs) or ''}", value, cpu_seconds() - cpu, time.perf_counter() - wall))
    return out


@pytest.fixture(scope="module", autouse=True)
def started_worker():
    R.math_score("1", "1")  # the worker's start-up (imports) is not part of any completion's time


@pytest.mark.parametrize("seed", range(N))
def test_every_reward_is_bounded_on_hostile_completions(seed):
    if seed % 2:
        results, errors = [], []
        thread = threading.Thread(target=lambda: _collect(seed, results, errors))
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        (scores,) = results
    else:
        scores = score_case(seed)
    completion, example = hostile_case(seed)
    where = f"seed {seed} ({len(completion)} chars, {example['answer_type']} {example['answer'][:40]!r})"
    for spec, value, cpu, _ in scores:
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, f"{where}: {spec} {value!r}"
        assert cpu <= CPU_BOUND_S, f"{where}: {spec} took {cpu:.2f} s of CPU"


def _collect(seed: int, results: list, errors: list) -> None:
    try:
        results.append(score_case(seed))
    except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
        errors.append(error)


def test_a_batch_of_hostile_completions_has_no_failures():
    """compute_rewards over a batch of 16 hostile cases: no counted failure, finite totals, timeouts reported."""
    cases = [hostile_case(10_000 + seed) for seed in range(16)]
    result = R.compute_rewards(SPECS, [c for c, _ in cases], [e for _, e in cases])
    assert result.failures == dict.fromkeys(result.names, 0)
    assert all(math.isfinite(v) for v in result.total.tolist())
    assert set(result.timeouts) == set(result.names)
    assert all(f"rewards/{name}/timeouts" in result.metrics() for name in result.names)


def summary(n: int) -> None:
    """Run n cases on the main thread and print calls, timeouts and the slowest calls."""
    R.math_score("1", "1")
    calls, timeouts_before, rows = 0, R.timeouts_so_far(), []
    for seed in range(n):
        for spec, value, cpu, wall in score_case(seed):
            assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (seed, spec, value)
            calls += 1
            rows.append((cpu, wall, seed, spec))
    rows.sort(reverse=True)
    print(f"{n} cases, {calls} reward calls, 0 raised, {R.timeouts_so_far() - timeouts_before} math timeouts")
    print(f"math workers killed: {R.MATH_WORKER.kills}")
    for cpu, wall, seed, spec in rows[:5]:
        completion, example = hostile_case(seed)
        print(
            f"  cpu {cpu:.2f} s  wall {wall:.2f} s  seed {seed}  {spec}  {len(completion)} chars  {completion[:60]!r}"
        )


if __name__ == "__main__":
    summary(int(sys.argv[1]) if len(sys.argv) > 1 else N)
