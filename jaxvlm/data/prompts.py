"""Prompt styles: how an example becomes chat messages (the prompt) and a target text (SFT / memorisation rows).

Each recipe asks its questions the way its authors did (docs/methods.md §1.6):

* ``"r1"`` — Curr-ReFT / CLGRPO / Infi-MMR (the R1-V lineage): the question followed by
  "First output the thinking process in <think> </think> tags and then output the final answer in <answer>
  </answer> tags." and a suffix by answer type (Curr-ReFT's per-stage suffixes: yes/no, option letters, boxes).
  Target: ``<think>{reasoning}</think>\\n<answer>{answer}</answer>``.
* ``"dyme"`` — DyME §2.5: "Your task is to answer the question below. Give step by step thinking before you
  answer, and when you're ready to answer, please use the format "Answer: .."\\n\\nQuestion:\\n\\n{question}".
  Target: ``{reasoning}\\nAnswer: {answer}`` (no think tags).
* ``"plain"`` — the bare question; target = the answer (plain SFT, evaluation of base models).
* ``"final_answer"`` — for small chat models on word problems (configs/smollm2_math.py): the question, then
  "End your reply with "The answer is N."" on its own line. Target: ``{reasoning}``, ending with the sentence
  ``The answer is {answer}.`` (appended when the reasoning does not already end with it). Read with
  `rewards.extract_answer(..., "last_number")`; `format_final_answer` rewards the closing sentence.

``with_caption=True`` prepends ``Caption: {caption}`` to the user text (Infi-MMR phase 2, caption-augmented).
Images come first in the user turn, as in all four code bases. The system prompt is left to the chat template
(Qwen's inserts "You are a helpful assistant." when there is none, SmolLM2's its own). A user turn without images is
one text string (`"content": "..."`), which every chat template renders, including those that only concatenate
strings (SmolLM2's); Qwen's renders it exactly as the one-text-part list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxvlm.data.example import ExampleError, example_location

PROMPT_STYLES = ("r1", "dyme", "plain", "final_answer")

R1_INSTRUCTION = (
    " First output the thinking process in <think> </think> tags and then output the final answer in "
    "<answer> </answer> tags."
)
R1_SUFFIX = {
    "yesno": " Ensure your final answer is exactly 'yes' or 'no'.",
    "choice": " Ensure your final answer is exactly one of the provided option letters without any additional text.",
    "multi_choice": (
        " Select all options that apply: ensure your final answer is one or more of the provided option letters, "
        "separated by commas, without any additional text."
    ),
    "number": " Ensure your final answer is a single number.",
    "math": "",
    "string": "",
    "bbox": " Output the final answer as one bounding box [x1, y1, x2, y2] in pixels in <answer> </answer> tags.",
    "labels": "",
}
DYME_TEMPLATE = (
    "Your task is to answer the question below. Give step by step thinking before you answer, and when you're "
    'ready to answer, please use the format "Answer: .."\n\nQuestion:\n\n{question}'
)
# "final_answer": the instruction after the question, and the closing sentence of its targets. Chosen by measuring
# SmolLM2-135M-Instruct's greedy accuracy on the gym's word_problems under several wordings (configs/smollm2_math.py).
FINAL_ANSWER_INSTRUCTION = '\nEnd your reply with "The answer is N."'
FINAL_ANSWER_SENTENCE = "The answer is {answer}."


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")


def user_text(example: Mapping[str, Any], style: str, *, with_caption: bool = False) -> str:
    """The text part of the user turn for `example` in prompt `style`."""
    _check_style(style)
    question = example["question"].strip()
    if with_caption:
        caption = example.get("caption", "").strip()
        if not caption:
            raise ExampleError(
                f"{example_location(example)}: field 'caption': empty, but the "
                "prompt asks for captions (data.with_caption=True)"
            )
        question = f"Caption: {caption}\n{question}"
    if style == "r1":
        return question + R1_INSTRUCTION + R1_SUFFIX[example.get("answer_type", "string")]
    if style == "dyme":
        return DYME_TEMPLATE.format(question=question)
    if style == "final_answer":
        return question + FINAL_ANSWER_INSTRUCTION
    return question


def prompt_messages(example: Mapping[str, Any], style: str, *, with_caption: bool = False) -> list[dict]:
    """Chat messages for `example`: one user turn with an image entry per image, then the text; without images the
    content is the text alone (a string: templates that concatenate strings, as SmolLM2's, need it)."""
    text = user_text(example, style, with_caption=with_caption)
    images = example.get("images", ())
    if not images:
        return [{"role": "user", "content": text}]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def target_text(example: Mapping[str, Any], style: str) -> str:
    """The reference completion for SFT and DyME memorisation rows (without the end-of-turn token).

    An example with a `target` (a verbatim completion, e.g. a kept rejection sample) returns it unchanged. Styles
    with a reasoning part need `example["reasoning"]`; an empty one is an ExampleError naming the example (never a
    silent answer-only target).
    """
    _check_style(style)
    if example.get("target"):
        return example["target"]
    answer = example["answer"]
    if style == "plain":
        return answer
    reasoning = example.get("reasoning", "").strip()
    if not reasoning:
        raise ExampleError(
            f"{example_location(example)}: field 'reasoning': empty, but prompt "
            f"style {style!r} trains on a reasoning target"
        )
    if style == "r1":
        return f"<think>{reasoning}</think>\n<answer>{answer}</answer>"
    if style == "final_answer":
        closing = FINAL_ANSWER_SENTENCE.format(answer=answer)
        return reasoning if reasoning.endswith(closing) else f"{reasoning} {closing}"
    return f"{reasoning}\nAnswer: {answer}"
