"""A small Qwen2.5-VL-style tokenizer trained locally.

Real Qwen2.5-VL checkpoints cannot be downloaded here, so tests and toy runs
use a byte-level BPE tokenizer trained on a tiny corpus with the `tokenizers`
library.  It mirrors the parts of the real tokenizer that the rest of jaxvlm
depends on:

* Qwen2's pre-tokenizer (NFC normalisation, the Qwen2 split regex, then
  byte-level mapping without a prefix space), so text is segmented the same way;
* the Qwen control tokens (`<|im_start|>`, `<|image_pad|>`, ...) as special
  added tokens placed after the BPE vocabulary, as in the real checkpoints;
* the reasoning tags (`<think>`, `<answer>`, ...) as added tokens that are
  never split but are *not* special, so `decode(..., skip_special_tokens=True)`
  keeps them and answer parsing still works (this is how Qwen3 registers them);
* the Qwen2.5-VL chat template;
* `eos_token="<|im_end|>"`, `pad_token="<|endoftext|>"`.

The result is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained`
loads it exactly like a real checkpoint's tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"

CONTROL_TOKENS = [
    PAD_TOKEN,
    IM_START_TOKEN,
    EOS_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
]
"""Tokens registered as *special* (dropped by `skip_special_tokens=True`)."""

REASONING_TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
"""Tokens that are single, never-split ids but stay visible when decoding."""

QWEN_SPECIAL_TOKENS = CONTROL_TOKENS + REASONING_TAG_TOKENS
"""Every token that is added on top of the BPE vocabulary, in id order."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The Qwen2.5-VL chat template (identical rendering to the released checkpoints)."""

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokenisation regex of Qwen2's tokenizer.json."""

MODEL_MAX_LENGTH = 32768


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's pre-tokenizer: regex split, then byte-level mapping (no prefix space)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE `tokenizers.Tokenizer` on `corpus`.

    The BPE part gets `vocab_size - len(QWEN_SPECIAL_TOKENS)` entries (the 256
    byte symbols plus learned merges; fewer if the corpus runs out of pairs),
    and the added tokens follow with the next ids, so the total never exceeds
    `vocab_size`.  Training is deterministic for a given corpus.
    """
    texts = [str(text) for text in corpus]
    if not texts:
        raise ValueError("corpus is empty: build_tokenizer needs at least one text to train on")
    byte_alphabet_size = len(pre_tokenizers.ByteLevel.alphabet())
    min_vocab_size = byte_alphabet_size + len(QWEN_SPECIAL_TOKENS)
    if vocab_size < min_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must cover the {byte_alphabet_size} byte symbols "
            f"plus {len(QWEN_SPECIAL_TOKENS)} added tokens (>= {min_vocab_size})"
        )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _qwen2_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))

    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in REASONING_TAG_TOKENS])
    return tokenizer


def build_tokenizer(
    corpus: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a small Qwen2.5-VL-style tokenizer on `corpus` and save it to `out_dir`.

    Returns the `transformers` tokenizer; `AutoTokenizer.from_pretrained(out_dir)`
    loads an identical one.  All token ids are `< vocab_size`.
    """
    backend = train_bpe_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[token for token in CONTROL_TOKENS if token not in (EOS_TOKEN, PAD_TOKEN)],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _single_token_id(tokenizer, token: str) -> int:
    """Id of `token`, which must be one token of `tokenizer`'s vocabulary."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no single token for {token!r}; is it a Qwen2.5-VL-style tokenizer?")
    return int(token_id)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the tokens the model and processor need.

    Keys: `image_token_id`, `video_token_id`, `vision_start_token_id`,
    `vision_end_token_id`, `im_start_token_id`, `eos_token_id`, `pad_token_id`.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; expected '<|im_end|>' for a Qwen2.5-VL-style tokenizer")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad_token; expected '<|endoftext|>' for a Qwen2.5-VL-style tokenizer")
    return {
        "image_token_id": _single_token_id(tokenizer, IMAGE_TOKEN),
        "video_token_id": _single_token_id(tokenizer, VIDEO_TOKEN),
        "vision_start_token_id": _single_token_id(tokenizer, VISION_START_TOKEN),
        "vision_end_token_id": _single_token_id(tokenizer, VISION_END_TOKEN),
        "im_start_token_id": _single_token_id(tokenizer, IM_START_TOKEN),
        "eos_token_id": int(tokenizer.eos_token_id),
        "pad_token_id": int(tokenizer.pad_token_id),
    }


# ----------------------------------------------------------------------------------------------------------
# The built-in model's tokenizer (trained on the gym) and the model config that matches it
# ----------------------------------------------------------------------------------------------------------

BUILTIN_VOCAB_SIZE = 1024
_BUILTIN_STAMP = "jaxvlm_builtin_tokenizer.json"


def builtin_corpus(gym_config=None, num_examples: int = 1500) -> list[str]:
    """Training text of the built-in tokenizer: the gym's questions, reasoning, captions and answers (all
    tasks, train split) plus every prompt style's fixed wording, so prompts tokenize compactly."""
    from jaxvlm.data import gym, prompts

    config = gym_config if gym_config is not None else gym.GymConfig()
    fixed = [
        prompts.R1_INSTRUCTION,
        prompts.DYME_TEMPLATE,
        *prompts.R1_SUFFIX.values(),
        DEFAULT_SYSTEM_PROMPT,
        "Caption: ",
        "Answer: ",
        "user",
        "assistant",
        "system",
    ]
    return fixed + gym.corpus_texts(config, num_examples=num_examples)


def builtin_tokenizer(
    directory: str | os.PathLike, *, vocab_size: int = BUILTIN_VOCAB_SIZE, gym_config=None, num_examples: int = 1500
):
    """The built-in model's tokenizer, trained on `builtin_corpus` and saved in `directory`.

    A directory that already holds one built with the same settings is loaded instead of retrained (a stamp
    file records the settings). Loading goes through `AutoTokenizer.from_pretrained`, exactly as for a real
    checkpoint's tokenizer.
    """
    import json

    from transformers import AutoTokenizer

    directory = os.fspath(directory)
    settings = {
        "vocab_size": int(vocab_size),
        "num_examples": int(num_examples),
        "gym_config": repr(gym_config) if gym_config is not None else "default",
    }
    stamp = os.path.join(directory, _BUILTIN_STAMP)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return AutoTokenizer.from_pretrained(directory)
    build_tokenizer(builtin_corpus(gym_config, num_examples), directory, vocab_size=vocab_size)
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return AutoTokenizer.from_pretrained(directory)


def configure_model_for_tokenizer(model_config, tokenizer):
    """`model_config` with its token ids (image/video/vision markers, eos, pad) taken from `tokenizer`.

    For models built from a preset with random weights (the built-in tokenizer places its special tokens after
    its BPE vocabulary). The vocabulary must fit: `len(tokenizer) <= vocab_size`, else ValueError.
    """
    ids = special_token_ids(tokenizer)
    if len(tokenizer) > model_config.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.text.vocab_size}"
        )
    text = dataclasses.replace(model_config.text, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    return model_config.replace(
        text=text,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
