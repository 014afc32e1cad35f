"""The rewards for small chat models on text word problems (configs/smollm2_math.py): the "last_number" and "boxed"
answer extraction styles, the thinking text they leave for think_f1, the `format_final_answer` reward, the start-up
check of `extract` values, and their bounds on hostile completions."""

from __future__ import annotations

import time

import pytest

from jaxvlm import configuration
from jaxvlm import rewards as R
from jaxvlm.configuration import base_config, gym_source, stage


def number_example(answer: str, reasoning: str = "") -> dict:
    return {"id": "t/number", "question": "q?", "answer": answer, "answer_type": "number", "reasoning": reasoning}


# ---------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Tom has 5 + 3 = 8 apples. The answer is 8.", "8"),
        ("so 4 - 1 = 3", "3"),
        ("It costs 1,000 dollars, then 2,500.", "2,500"),  # thousands separators are one number
        ("The answer is -3.", "-3"),  # a sign directly before the digits is kept
        ("5-2=3", "3"),
        ("half: 0.5", "0.5"),
        ("3, 4, 5", "5"),
        ("12,5", "5"),  # not a thousands group: two numbers
        ("x2 and y3", None),  # digits inside a word are no number
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_last_number(completion, expected):
    assert R.extract_answer(completion, "last_number") == expected


def test_last_number_reads_like_the_number_parser():
    """What last_number extracts, number_score parses as exactly that one number (commas included)."""
    for completion, answer in (("... = 1,000 stickers. The answer is 1,000.", "1000"), ("so 7.", "7")):
        assert R.parse_single_number(R.extract_answer(completion, "last_number")) == float(answer)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so \\boxed{7}.", "7"),
        ("\\boxed{ 12 }", "12"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces matched
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the last one
        ("\\boxed{{a}{b}} tail }", "{a}{b}"),
        ("\\boxed{}", ""),
        ("\\boxed{7", None),  # never closed
        ("\\boxed{1} and \\boxed{2", None),  # the last one is never closed
        ("\\boxed 7", None),
        ("no box", None),
    ],
)
def test_extract_boxed(completion, expected):
    assert R.extract_answer(completion, "boxed") == expected


def test_unknown_style_names_the_styles():
    with pytest.raises(ValueError, match="last_number"):
        R.extract_answer("x", "last")


# ---------------------------------------------------------------------------------------------------------------
# Accuracy with the new styles


def test_accuracy_with_last_number():
    example = number_example("8")
    right = "Tom starts with 5 apples. After buying 3 more, Tom has 5 + 3 = 8 apples. The answer is 8."
    assert R.accuracy(right, example, extract="last_number", use_math_verify=False) == 1.0
    assert R.accuracy("5 + 3 = 8 apples, then 9 + 1 = 10.", example, extract="last_number") == 0.0  # ran on
    assert R.accuracy("no number", example, extract="last_number") == 0.0
    assert R.accuracy("The answer is 1,000.", number_example("1000"), extract="last_number") == 1.0
    assert R.accuracy("The answer is 8.0", example, extract="last_number") == 1.0  # compared as numbers
    # The answer cap applies to the extracted number (a 2,000-digit number scores 0 without being parsed).
    assert R.accuracy("The answer is " + "9" * 2000, number_example("9" * 2000), extract="last_number") == 0.0


def test_accuracy_with_boxed():
    example = number_example("8")
    assert R.accuracy("so \\boxed{8}.", example, extract="boxed") == 1.0
    assert R.accuracy("\\boxed{8} no, \\boxed{9}", example, extract="boxed") == 0.0  # the last box counts
    assert R.accuracy("8", example, extract="boxed") == 0.0  # no box: no answer
    math = {**number_example("\\frac{1}{2}"), "answer_type": "math"}
    assert R.accuracy("\\boxed{\\frac{1}{2}}", math, extract="boxed", use_math_verify=False) == 1.0
    assert R.accuracy("\\boxed{" + "1" * 2000 + "}", number_example("1"), extract="boxed") == 0.0  # over the cap


# ---------------------------------------------------------------------------------------------------------------
# Thinking text and think_f1


def test_thinking_text_of_each_style():
    text = "Tom has 5 + 3 = 8 apples. The answer is 8."
    assert R.thinking_text(text, "last_number") == "Tom has 5 + 3 = 8 apples. The answer is"
    assert R.thinking_text("no number", "last_number") == "no number"
    assert R.thinking_text("so 1 + 1 = \\boxed{2}", "boxed") == "so 1 + 1 ="
    assert R.thinking_text("reasoning\nAnswer: 2", "dyme") == "reasoning"
    assert R.thinking_text("<think>r</think><answer>2</answer>", "tags") == "r"
    with pytest.raises(ValueError, match="think_f1: extract must be one of"):
        R.thinking_text("x", "raw")


def test_think_f1_with_last_number():
    reasoning = "Tom starts with 5 apples. After buying 3 more, Tom has 5 + 3 = 8 apples. The answer is 8."
    example = number_example("8", reasoning)
    assert R.think_f1_reward(reasoning, example, extract="last_number") == 1.0
    assert 0.0 < R.think_f1_reward("Tom buys apples. The answer is 8.", example, extract="last_number") < 1.0
    assert R.think_f1_reward("8", example, extract="last_number") == 0.0  # nothing before the answer
    with pytest.raises(ValueError, match="extract must be one of"):
        R.think_f1_reward(reasoning, example, extract="raw")


# ---------------------------------------------------------------------------------------------------------------
# The format reward


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Tom has 5 + 3 = 8 apples. The answer is 8.", 1.0),
        ("The answer is 8", 1.0),  # the full stop is optional
        ("the answer is: 1,000.  \n", 1.0),  # any case, a colon, trailing whitespace
        ("THE ANSWER IS -2.", 1.0),
        ("The answer is 8 apples.", 0.0),  # one number and nothing else after the phrase
        ("The answer is N.", 0.0),
        ("The answer is 8.\nThis is a classic example of a puzzle.", 0.0),  # it does not close the reply
        ("The answer is 3. No wait, the answer is 8.", 0.0),  # twice
        ("8", 0.0),
        ("", 0.0),
    ],
)
def test_format_final_answer(completion, expected):
    assert R.format_final_answer(completion) == expected
    assert R.get_reward("format_final_answer") is R.format_final_answer


def test_format_final_answer_agrees_with_the_prompt_style():
    """The "final_answer" prompt style's SFT targets are what its format reward wants, and what last_number reads."""
    from jaxvlm.data import prompts
    from jaxvlm.data.gym import GymConfig, GymSource

    source = GymSource("train", 9, GymConfig(tasks=("word_problems",), difficulties=(0, 1, 2)))
    for i in range(len(source)):
        example = source[i]
        target = prompts.target_text(example, "final_answer")
        assert target == example["reasoning"]  # the gym's reasoning already closes with the sentence
        assert R.format_final_answer(target) == 1.0
        assert R.accuracy(target, example, extract="last_number", use_math_verify=False) == 1.0
        user = prompts.user_text(example, "final_answer")
        assert user == example["question"] + '\nEnd your reply with "The answer is N."'
    plain = {**number_example("4"), "reasoning": "2 + 2 = 4."}
    assert prompts.target_text(plain, "final_answer") == "2 + 2 = 4. The answer is 4."


# ---------------------------------------------------------------------------------------------------------------
# extract values are checked when a spec is parsed: a start-up error naming the config key


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "accuracy", "kwargs": {"extract": "last"}}, r"kwargs\['extract'\] must be one of .*'last_number'"),
        ({"name": "iou", "kwargs": {"extract": "box"}}, r"kwargs\['extract'\] must be one of .*'boxed'"),
        ({"name": "think_f1", "kwargs": {"extract": "raw"}}, r"kwargs\['extract'\] must be one of \('tags'"),
    ],
)
def test_bad_extract_values_are_refused_when_parsed(entry, message):
    with pytest.raises(ValueError, match=message):
        R.parse_reward_specs([entry])


def test_good_extract_values_parse():
    for style in R.EXTRACT_STYLES:
        R.parse_reward_specs([{"name": "accuracy", "kwargs": {"extract": style, "use_math_verify": False}}])
    for style in R.THINKING_STYLES:
        R.parse_reward_specs([{"name": "think_f1", "kwargs": {"extract": style}}])


def test_a_bad_extract_in_a_config_is_a_start_up_error_naming_the_key():
    c = base_config()
    c.stage_order = ("grpo",)
    c.stages.grpo = stage(
        "grpo",
        steps=1,
        data=dict(sources=[gym_source("train", 8, tasks=("word_problems",))], batch_size=2),
        rewards=["format_final_answer", {"name": "accuracy", "kwargs": {"extract": "last_numbr"}}],
        accuracy_reward="accuracy",
    )
    with pytest.raises(configuration.ConfigError, match=r"^config\.stages\.grpo\.rewards: .*'last_numbr'") as info:
        configuration.check_config(c)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Bounded on hostile completions (linear scans; the caps apply before any parsing)

HOSTILE = {
    "digits, 300 KB": "9" * 300_000,
    "thousands groups, 200 KB": "1" + ",000" * 50_000,
    "numbers, 250 KB": "1 " * 125_000,
    "boxes, 280 KB": "\\boxed{1}" * 30_000,
    "unclosed box, 200 KB": "\\boxed{" + "{" * 200_000,
    "deep box, 200 KB": "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",
    "answer phrases, 260 KB": "The answer is 7. " * 16_000,
    "answer phrase + long tail": "The answer is " + "7" * 200_000,
    "signs and dots, 200 KB": "-." * 100_000,
}
SPECS = [
    R.RewardSpec("format_final_answer"),
    R.RewardSpec("accuracy", kwargs={"extract": "last_number", "use_math_verify": False}),
    R.RewardSpec("accuracy", kwargs={"extract": "boxed", "use_math_verify": False}),
    R.RewardSpec("think_f1", kwargs={"extract": "last_number"}),
    R.RewardSpec("think_f1", kwargs={"extract": "boxed"}),
]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_completions_are_bounded(case):
    example = number_example("7", reasoning="so the answer is seven")
    completion = HOSTILE[case]
    for spec in SPECS:
        start = time.process_time()
        value = R.get_reward(spec.name)(completion, example, **spec.kwargs)
        cpu = time.process_time() - start
        assert 0.0 <= value <= 1.0, (case, spec)
        assert cpu < 2.0, f"{case} x {spec}: {cpu:.2f} s of CPU"
    result = R.compute_rewards(SPECS, [completion], [example])
    assert result.failures == dict.fromkeys(result.names, 0)
