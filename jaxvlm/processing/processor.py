"""Torch-free Qwen2.5-VL / Qwen3-VL processor: chat text + images -> padded numpy model batch.

Mirrors `transformers.Qwen2_5_VLProcessor` and `transformers.Qwen3VLProcessor` for images (the two expand images
alike; the families differ only in the image processor's settings and the chat template): every `<|image_pad|>`
placeholder in a text is expanded to `t * h * w // merge_size**2` copies (one
per LLM token the vision tower produces for that image), the texts are
tokenized without extra special tokens and padded, and the M-RoPE position ids
are computed on the host with `get_rope_index`. Like transformers' processor it
also returns `mm_token_type_ids`, from which transformers' model builds the
M-RoPE positions (without it, that model silently uses 1-D positions).

Videos are not supported: a text with a video placeholder (`<|video_pad|>`) is a ValueError, as it is in
transformers' processors called without videos, rather than being tokenized as text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxvlm.processing.image import ImageProcessor
from jaxvlm.processing.rope import get_rope_index, text_position_ids

ON_OVERFLOW_CHOICES = ("error", "truncate")
PADDING_SIDES = ("left", "right")
# transformers' `mm_token_type_ids` values (ProcessorMixin.create_mm_token_type_ids; video is 2, audio 3, and
# transformers' processor rejects their placeholders without videos / audio, which this processor never takes).
TEXT_TOKEN_TYPE, IMAGE_TOKEN_TYPE = 0, 1
# The processor-level chat template file of older checkpoints (Qwen2.5-VL's, Qwen3-VL's on the hub), which
# transformers' processors read and its tokenizers do not.
LEGACY_CHAT_TEMPLATE_NAME = "chat_template.json"


def _is_single_image(value: Any) -> bool:
    """True for one image (PIL image or numpy array) rather than a list of images."""
    return isinstance(value, (Image.Image, np.ndarray))


def _images_per_sample(images: Any, num_samples: int, single_text: bool) -> list[list[Any]]:
    """Normalise `images` to one (possibly empty) list of images per sample."""
    if images is None:
        return [[] for _ in range(num_samples)]
    if single_text:
        if _is_single_image(images):
            return [[images]]
        if isinstance(images, Sequence) and len(images) == 1 and isinstance(images[0], (list, tuple)):
            return [list(images[0])]
        if isinstance(images, Sequence):
            return [list(images)]
    if not isinstance(images, Sequence) or _is_single_image(images):
        raise TypeError(f"images must be None or a list with one list of images per text, got {type(images).__name__}")
    if len(images) != num_samples:
        raise ValueError(f"got {num_samples} texts but images has {len(images)} entries (one list per text)")
    per_sample = []
    for index, sample_images in enumerate(images):
        if sample_images is None:
            per_sample.append([])
        elif _is_single_image(sample_images):
            per_sample.append([sample_images])
        elif isinstance(sample_images, Sequence):
            per_sample.append(list(sample_images))
        else:
            raise TypeError(
                f"images[{index}] must be None, an image or a list of images, got {type(sample_images).__name__}"
            )
    return per_sample


def expand_image_placeholders(text: str, image_token: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the k-th `image_token` in `text` by `tokens_per_image[k]` copies of it.

    The number of placeholders must equal `len(tokens_per_image)`.
    """
    parts = text.split(image_token)
    if len(parts) - 1 != len(tokens_per_image):
        raise ValueError(
            f"text has {len(parts) - 1} {image_token!r} placeholders but {len(tokens_per_image)} images were given"
        )
    pieces = [parts[0]]
    for count, part in zip(tokens_per_image, parts[1:]):
        pieces.append(image_token * int(count))
        pieces.append(part)
    return "".join(pieces)


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, *, padding_side: str, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token lists to `length` -> (`input_ids` int32 `[B, length]`, `attention_mask` int32 `[B, length]`)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    input_ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(sequences), length), dtype=np.int32)
    for row, sequence in enumerate(sequences):
        start = length - len(sequence) if padding_side == "left" else 0
        input_ids[row, start : start + len(sequence)] = sequence
        attention_mask[row, start : start + len(sequence)] = 1
    return input_ids, attention_mask


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """transformers' `mm_token_type_ids` of a padded batch: int32 `[B, T]`, `IMAGE_TOKEN_TYPE` (1) at the image
    tokens, `TEXT_TOKEN_TYPE` (0) everywhere else, padding included (transformers' processor gives the same values
    as int64)."""
    types = np.full(input_ids.shape, TEXT_TOKEN_TYPE, dtype=np.int32)
    types[input_ids == image_token_id] = IMAGE_TOKEN_TYPE
    return types


def _round_up(value: int, multiple: int | None) -> int:
    """`value` rounded up to a multiple of `multiple` (unchanged when `multiple` is None)."""
    if multiple is None:
        return value
    if multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {multiple}")
    return -(-value // multiple) * multiple


class Processor:
    """Tokenizer + `ImageProcessor` -> numpy batches for the JAX Qwen2.5-VL / Qwen3-VL models."""

    def __init__(
        self,
        tokenizer,
        image_processor: ImageProcessor,
        *,
        image_token: str = "<|image_pad|>",
        video_token: str = "<|video_pad|>",
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.video_token = video_token  # refused in texts: this processor takes no videos
        token_ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(
                f"image_token {image_token!r} is not a single token of the tokenizer (encodes to {token_ids})"
            )
        self._image_token_id = int(token_ids[0])
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad_token; set one (Qwen uses '<|endoftext|>') before batching")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Processor:
        """Load the tokenizer (`AutoTokenizer`) and image processor from a checkpoint directory.

        The chat template is the tokenizer's (`chat_template.jinja` or `tokenizer_config.json`); a tokenizer
        without one takes the checkpoint's `chat_template.json` (the processor-level file of older checkpoints).
        `AutoTokenizer` is imported here rather than at module level because
        transformers' auto classes import torch when it is installed.
        """
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
        legacy_template = os.path.join(os.fspath(path), LEGACY_CHAT_TEMPLATE_NAME)
        if tokenizer.chat_template is None and os.path.isfile(legacy_template):
            with open(legacy_template, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if not isinstance(template, str):
                raise ValueError(f"{legacy_template}: field 'chat_template' must be a string, got {template!r}")
            tokenizer.chat_template = template
        return cls(tokenizer, ImageProcessor.from_pretrained(path), **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files and `preprocessor_config.json` to `path`."""
        self.tokenizer.save_pretrained(os.fspath(path))
        self.image_processor.save_pretrained(path)

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation (or a list of conversations) with the tokenizer's chat template."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _truncate(self, ids: list[int], sample: int, max_length: int, on_overflow: str) -> list[int]:
        """Enforce `max_length` on one sample's token ids."""
        if len(ids) <= max_length:
            return ids
        num_image_tokens = sum(token == self._image_token_id for token in ids)
        if on_overflow == "truncate":
            dropped_image_tokens = sum(token == self._image_token_id for token in ids[max_length:])
            if dropped_image_tokens == 0:
                return ids[:max_length]
            raise ValueError(
                f"sample {sample} has {len(ids)} tokens > max_length={max_length} and truncating would drop "
                f"{dropped_image_tokens} of its {num_image_tokens} image tokens; shrink the image "
                "(max_pixels) or raise max_length"
            )
        raise ValueError(
            f"sample {sample} has {len(ids)} tokens (including {num_image_tokens} image tokens) "
            f"but max_length={max_length}"
        )

    def __call__(
        self,
        texts: str | list[str],
        images: Any = None,
        *,
        padding_side: str = "left",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        on_overflow: str = "error",
    ) -> dict[str, np.ndarray]:
        """Tokenize texts with image placeholders into a padded model batch.

        texts: one string or B strings, each with one `<|image_pad|>` per image (and no `<|video_pad|>`).
        images: None, or per sample a list of images (PIL or uint8 numpy);
        with a single string, a list of that sample's images.
        max_length: samples longer than this raise (`on_overflow="error"`) or,
        with `on_overflow="truncate"`, lose their trailing tokens unless that
        would drop image tokens (then it raises).

        Returns numpy arrays: `input_ids` int32 `[B, T]`, `attention_mask` int32
        `[B, T]`, `position_ids` int32 `[3, B, T]`, `rope_deltas` int32 `[B, 1]`,
        `mm_token_type_ids` int32 `[B, T]` (1 at image tokens, else 0: what
        transformers' processor returns, always, and its model needs for M-RoPE),
        and, when there are images, `pixel_values` float32 `[N, patch_dim]` and
        `image_grid_thw` int64 `[num_images, 3]` (images in sample order).
        """
        if on_overflow not in ON_OVERFLOW_CHOICES:
            raise ValueError(f"on_overflow must be one of {ON_OVERFLOW_CHOICES}, got {on_overflow!r}")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        single_text = isinstance(texts, str)
        texts = [texts] if single_text else list(texts)
        if not texts:
            raise ValueError("texts is empty: pass at least one string")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
        per_sample_images = _images_per_sample(images, len(texts), single_text)

        for index, (text, sample_images) in enumerate(zip(texts, per_sample_images)):
            if self.video_token and self.video_token in text:
                raise ValueError(
                    f"sample {index}: text has {text.count(self.video_token)} {self.video_token!r} video "
                    "placeholders; videos are not supported (images only): remove the video from the prompt"
                )
            num_placeholders = text.count(self.image_token)
            if num_placeholders != len(sample_images):
                raise ValueError(
                    f"sample {index}: text has {num_placeholders} {self.image_token!r} placeholders but "
                    f"{len(sample_images)} images were given"
                )

        flat_images = [image for sample_images in per_sample_images for image in sample_images]
        vision = self.image_processor(flat_images) if flat_images else None
        merge_length = self.image_processor.merge_size**2
        tokens_per_image = (
            (vision["image_grid_thw"].prod(axis=-1) // merge_length).tolist() if vision is not None else []
        )

        expanded_texts = []
        offset = 0
        for text, sample_images in zip(texts, per_sample_images):
            counts = tokens_per_image[offset : offset + len(sample_images)]
            offset += len(sample_images)
            expanded_texts.append(expand_image_placeholders(text, self.image_token, counts))

        token_lists = self.tokenizer(expanded_texts, add_special_tokens=False)["input_ids"]
        if max_length is not None:
            token_lists = [
                self._truncate(list(ids), index, max_length, on_overflow) for index, ids in enumerate(token_lists)
            ]
        length = _round_up(max(len(ids) for ids in token_lists), pad_to_multiple_of)
        input_ids, attention_mask = pad_sequences(
            token_lists, self.pad_token_id, padding_side=padding_side, length=length
        )

        if vision is None:
            position_ids = np.broadcast_to(text_position_ids(attention_mask), (3, *input_ids.shape)).copy()
            rope_deltas = np.zeros((input_ids.shape[0], 1), dtype=np.int32)
        else:
            position_ids, rope_deltas = get_rope_index(
                input_ids,
                attention_mask,
                vision["image_grid_thw"],
                image_token_id=self._image_token_id,
                spatial_merge_size=self.image_processor.merge_size,
            )
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "rope_deltas": rope_deltas,
            "mm_token_type_ids": mm_token_type_ids(input_ids, self._image_token_id),
        }
        if vision is not None:
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
        return batch

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode `[B, T]` token ids (numpy / jax array, or ragged lists) to strings."""
        rows = [_as_int_list(row) for row in ids]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs) -> str:
        """Decode one `[T]` sequence of token ids."""
        return self.tokenizer.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens, **kwargs)


def _as_int_list(ids: Any) -> list[int]:
    """`[T]` ids from a list or any array type as a list of Python ints."""
    return [int(token) for token in np.asarray(ids).reshape(-1)]
