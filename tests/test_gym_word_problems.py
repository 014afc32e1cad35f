"""The gym's opt-in `word_problems` task (1-3 events of adding / taking away; configs/smollm2_math.py): answers
recomputed from the question text alone, reasoning whose every step is right, the difficulty knob, splits that never
share a problem, and the default suite left as it was."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from jaxvlm.data import gym
from jaxvlm.data.example import validate_example
from jaxvlm.data.gym import GymConfig, GymSource

TASK = "word_problems"
GAIN = re.compile(r"^(?:buys|finds) (\d+) more$|^gets (\d+) more from (\w+)$")
LOSS = re.compile(r"^(?:loses|sells) (\d+)$|^gives (\d+) to (\w+)$")
QUESTION = re.compile(r"^(\w+) has (\d+) (\w+)(?:, | and )(.*)\. How many (\w+) does (\w+) have now\?$")
STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+) (\w+)\.")


def source(split: str, n: int, difficulties=(0, 1, 2), seed: int = 0) -> GymSource:
    return GymSource(split, n, GymConfig(tasks=(TASK,), difficulties=difficulties, seed=seed))


def solve(question: str) -> tuple[int, list[int]]:
    """(answer, counts after each event) from the question's words alone."""
    name, start, items, rest, items_again, name_again = QUESTION.fullmatch(question).groups()
    assert (items, name) == (items_again, name_again)
    events = re.split(r", and then |, | and then | and ", rest)
    count, counts = int(start), []
    for event in events:
        gain, loss = GAIN.fullmatch(event), LOSS.fullmatch(event)
        assert (gain is None) != (loss is None), event
        match = gain or loss
        n = int(match.group(1) or match.group(2))
        friend = match.group(3)
        assert friend is None or friend != name
        count = count + n if gain else count - n
        counts.append(count)
    return count, counts


@pytest.fixture(scope="module")
def train():
    return [source("train", 120)[i] for i in range(120)]


def test_answers_follow_from_the_question_alone(train):
    for example in train:
        validate_example(example)
        assert example["task"] == TASK and example["answer_type"] == "number" and example["images"] == []
        answer, counts = solve(example["question"])
        assert example["answer"] == str(answer), example["question"]
        assert len(counts) == gym.word_problem_steps(example["difficulty"])
        assert min(counts) >= 1  # never everything taken away, never a negative count
        low, high = gym.WORD_PROBLEM_START
        assert low <= int(re.search(r"has (\d+)", example["question"]).group(1)) <= high


def test_reasoning_writes_out_every_step_correctly(train):
    for example in train:
        reasoning = example["reasoning"]
        assert reasoning.endswith(f"The answer is {example['answer']}.")
        steps = STEP.findall(reasoning)
        _, counts = solve(example["question"])
        assert [int(c) for *_, c, _ in steps] == counts
        for a, sign, b, c, noun in steps:
            assert int(c) == (int(a) + int(b) if sign == "+" else int(a) - int(b))
            low, high = gym.WORD_PROBLEM_CHANGE
            assert low <= int(b) <= high
            assert (noun[-1] == "s") == (int(c) != 1), reasoning  # "1 apple", "2 apples"
        for later, earlier in zip(steps[1:], steps):
            assert later[0] == earlier[3]  # each step starts from the previous result


def test_difficulty_is_the_number_of_events_and_cycles():
    mixed = source("validation", 30, difficulties=(0, 0, 1))
    levels = [mixed[i]["difficulty"] for i in range(30)]
    assert levels == [(0, 0, 1)[i % 3] for i in range(30)]
    for level in (0, 1, 2):
        one_level = source("validation", 12, difficulties=(level,))
        for i in range(12):
            example = one_level[i]
            assert len(solve(example["question"])[1]) == level + 1
            assert example["question"].count(" and then ") == (level > 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_never_share_a_problem(seed):
    """Train / validation / test are disjoint by the gym's signature hash, for every difficulty mix and seed; within
    a split no problem repeats."""
    sizes = {"train": 1200, "validation": 150, "test": 150}
    questions, signatures = {}, {}
    for split, n in sizes.items():
        src = source(split, n, seed=seed)
        specs = [src.spec(i) for i in range(n)]
        questions[split] = {s.question for s in specs}
        signatures[split] = {s.signature for s in specs}
        assert len(questions[split]) == n, f"a problem repeats in {split}"
        assert all(gym.split_of_signature(s) == split for s in signatures[split])
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not questions[a] & questions[b], (a, b)
        assert not signatures[a] & signatures[b], (a, b)
    # The comparison's own mix (configs/smollm2_math.py: difficulties (0, 0, 1)) against every level's test split.
    mix = source("train", 600, difficulties=(0, 0, 1), seed=seed)
    mix_train = {mix.spec(i).question for i in range(600)}
    assert not mix_train & questions["test"] and not mix_train & questions["validation"]


def test_is_opt_in_and_leaves_the_default_suite_as_it_was():
    """word_problems is not in TASKS: the default examples and the built-in tokenizer's corpus are those of the
    tree before the task was added (digest taken there), so the tiny-model results (RESULTS.md) still hold."""
    assert TASK not in gym.TASKS and TASK in gym.EXTRA_TASKS and TASK in gym.ALL_TASKS
    assert GymConfig().tasks == gym.TASKS
    assert gym.TASK_STAGE[TASK] == gym.TEXT_ONLY_STAGE and gym.TASK_ANSWER_TYPE[TASK] == "number"
    digest = hashlib.sha256()
    src = GymSource("train", 90)
    for i in range(len(src)):
        spec = src.spec(i)
        fields = [spec.id, spec.question, spec.answer, spec.reasoning, spec.scene.signature() if spec.scene else ""]
        digest.update(json.dumps(fields).encode())
    digest.update(json.dumps(gym.corpus_texts(num_examples=300)).encode())
    assert digest.hexdigest() == "8e8e2d0a7de134fbfed6294ecc034b855a1ce3362e1e44c8e195ff437c23be5f"
    with pytest.raises(ValueError, match="word_problems"):
        GymConfig(tasks=("word_problem",))  # the error lists the opt-in tasks too
