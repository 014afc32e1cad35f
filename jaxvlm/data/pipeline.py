"""The grain input pipeline: examples -> static-shape model batches, deterministic and checkpointable.

    source(s) -> shuffle(seed) -> repeat(epochs) [-> mix(weights)] -> shard by process -> encode (threads)
              -> count skipped -> batch + pad to buckets -> prefetch (thread or worker processes)

* **Encode** (`ExampleEncoder`, per example): render the prompt with the tokenizer's chat template in the
  configured style (`jaxvlm.data.prompts`), preprocess the images (`ImageProcessor`), expand each image
  placeholder to its patch tokens, tokenize; with `with_targets`, tokenize the reference completion
  (target + end-of-turn) for SFT and DyME's memorisation rows. A prompt or target over its limit is a
  `DataError("file:line: ...", kind="too_long")`.
* **Skip or raise** (`data.on_error`): with "raise" the first bad record stops the run with its file:line; with
  "skip" it is dropped and counted by kind: each batch carries the records dropped while it was read
  (`batch["skipped"]`), and `add_skip_counts` keeps the running totals. A record is never replaced by another.
  Records dropped after the last batch (bad records at the end of a finite stream, and the rows of a dropped
  remainder) are counted in the last batch, which is handed out once the stream is known to end there. A finite
  stream that yields no batch while records were skipped is a `DataError` naming the sources and the counts, not
  an empty stream (a stage whose every record is bad must fail, not train 0 steps and be marked done).
* **Special tokens in data text** are rejected: a question, caption, reasoning, answer, target or option that
  contains one of the tokenizer's special tokens (`<|im_end|>`, `<|image_pad|>`, ...) is a
  `DataError("file:line: field 'question': contains the special token ...", kind="field")`. Typed into the prompt
  it would be tokenized as the control token itself (ending the turn, or posing as an image placeholder), so such a
  record is never encoded. The reasoning tags (`<think>`, `<answer>`) are added but not special tokens: they stay
  allowed.
* **Batch** (`BatchCollator`): prompts left-padded to the smallest length bucket that fits (the sampler needs
  each row's last column to be its last prompt token), targets right-padded to `max_target_length`, the rows'
  image patches concatenated, M-RoPE positions computed on the host. The images are laid out in bucketed image
  slots where they go to the device (`sampling.prepare_prompts`, `batching.microbatches`), so only a handful of
  shapes ever reach jit.
* **State**: `iterator.get_state()` is a JSON-serialisable dict (saved by `TrainCheckpointer` as `data_state`);
  `iterator.set_state(state)` resumes at the next unseen batch.

Sharding: each process reads rows `process_index::process_count` of the shuffled global order, so the union
over processes of step k's batches is the same set of examples for any number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxvlm import checks
from jaxvlm.data import prompts
from jaxvlm.data.example import ExampleError, brief_text, example_location
from jaxvlm.data.jsonl import DEFAULT_MAX_IMAGE_PIXELS, DataError, max_image_pixels_problem
from jaxvlm.processing.image import ImageProcessor
from jaxvlm.processing.processor import expand_image_placeholders, pad_sequences
from jaxvlm.processing.rope import get_rope_index, text_position_ids

ON_ERROR_CHOICES = ("raise", "skip")
SKIP_KINDS = ("parse", "field", "missing_image", "bad_image", "too_long")
IMAGE_TOKEN = "<|image_pad|>"
# Example fields whose text reaches the prompt or the target (options: scored, and written into questions).
USER_TEXT_FIELDS = ("question", "caption", "reasoning", "answer", "target", "options")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples become batches. `batch_size` is the number of rows this process produces per batch."""

    batch_size: int
    prompt_style: str = "r1"  # r1 | dyme | plain (jaxvlm.data.prompts)
    with_caption: bool = False  # prepend "Caption: ..." (Infi-MMR phase 2)
    with_targets: bool = False  # also tokenize the reference completion (SFT, DyME memorisation rows)
    max_prompt_length: int = 512  # tokens, image tokens included; longer prompts are bad records
    max_target_length: int = 256  # tokens incl. end-of-turn; also the static completion width
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height of one image file; larger ones are bad records
    prompt_buckets: tuple[int, ...] = ()  # padded prompt lengths; () = powers of two (>= 16) up to the max
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None = repeat forever; with a mixture, epochs of the first source
    shard_by_process: bool = True
    on_error: str = "raise"  # raise | skip
    num_threads: int = 2  # threads encoding examples
    prefetch: int = 2  # batches prepared ahead by a background thread (0 = none)
    worker_processes: int = 0  # > 0: encode and batch in grain worker processes instead
    drop_remainder: bool = True
    keep_images: bool = False  # also keep the decoded images in `batch["examples"]` (e.g. to write samples out)

    def __post_init__(self):
        """FieldError (a ValueError) naming the first field out of range."""
        checks.check_fields(self, PIPELINE_RULES)
        if self.prompt_buckets and self.prompt_buckets[-1] < self.max_prompt_length:
            raise checks.FieldError(
                "prompt_buckets",
                f"the largest entry {self.prompt_buckets[-1]} must be >= max_prompt_length={self.max_prompt_length}",
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PipelineConfig:
        """From a plain dict / ConfigDict; an unknown key is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known: {sorted(names)}")
        values = dict(values)
        if "prompt_buckets" in values:
            values["prompt_buckets"] = tuple(values["prompt_buckets"])  # checked: 64.5 is an error, not 64
        return cls(**values)


def _increasing_positive(buckets) -> str | None:
    ints = isinstance(buckets, tuple) and all(checks.integer(1)(b) is None for b in buckets)
    if not ints or list(buckets) != sorted(set(buckets)):
        return f"must be strictly increasing positive ints, got {buckets}"
    return None


PIPELINE_RULES = {
    "batch_size": checks.integer(1),
    "prompt_style": checks.one_of(*prompts.PROMPT_STYLES),
    "with_caption": checks.boolean,
    "with_targets": checks.boolean,
    "max_prompt_length": checks.integer(1),
    "max_target_length": checks.integer(1),
    "max_image_pixels": max_image_pixels_problem,
    "prompt_buckets": _increasing_positive,
    "shuffle": checks.boolean,
    "seed": checks.integer(0),
    "num_epochs": checks.optional(checks.integer(1)),
    "shard_by_process": checks.boolean,
    "on_error": checks.one_of(*ON_ERROR_CHOICES),
    "num_threads": checks.integer(1),
    "prefetch": checks.integer(0),
    "worker_processes": checks.integer(0),
    "drop_remainder": checks.boolean,
    "keep_images": checks.boolean,
}


def _bucket(value: int, buckets: Sequence[int], what: str, floor: int = 1) -> int:
    """Smallest bucket >= value; with no buckets, the next power of two (>= floor)."""
    if buckets:
        for bucket in buckets:
            if bucket >= value:
                return bucket
        raise ValueError(f"{what} of {value} exceeds the largest bucket {buckets[-1]}")
    return max(floor, 1 << (max(value, 1) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Placeholder for a bad record when `on_error="skip"` (dropped and counted by `SkipCounting`)."""

    kind: str
    message: str


def example_metadata(example: Mapping[str, Any], keep_images: bool = False) -> dict[str, Any]:
    """The example without its pixels (unless `keep_images`), plus `num_images`: what rewards and evaluation
    need on the host."""
    meta = {k: v for k, v in example.items() if keep_images or k != "images"}
    meta["num_images"] = len(example.get("images", ()))
    return meta


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens (control tokens such as `<|im_end|>`, `<|image_pad|>`), longest first.

    The special added tokens and `all_special_tokens`, plus IMAGE_TOKEN; added tokens that are not special (the
    reasoning tags `<think>`, `<answer>`) are ordinary text and not included.
    """
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {token.content for token in added.values() if getattr(token, "special", False)}
    tokens |= set(getattr(tokenizer, "all_special_tokens", ()) or ())
    tokens.add(IMAGE_TOKEN)
    return tuple(sorted((t for t in tokens if t), key=lambda t: (-len(t), t)))


def user_texts(example: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field name, text) of the example's USER_TEXT_FIELDS that hold text (options as `options[k]`)."""
    texts = []
    for field in USER_TEXT_FIELDS:
        value = example.get(field)
        if isinstance(value, str):
            texts.append((field, value))
        elif field == "options" and isinstance(value, (list, tuple)):
            texts.extend((f"options[{k}]", v) for k, v in enumerate(value) if isinstance(v, str))
    return texts


class ExampleEncoder:
    """example dict -> token ids + pixels (or `Skipped`); picklable, so grain workers can run it."""

    def __init__(self, tokenizer, image_processor: ImageProcessor | None, config: PipelineConfig):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template; jaxvlm renders prompts with it")
        ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
        if image_processor is not None and len(ids) != 1:  # a text-only model's tokenizer needs no image token
            raise ValueError(f"{IMAGE_TOKEN!r} is not a single token of the tokenizer (encodes to {ids})")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token ('<|im_end|>' for Qwen); targets end with it")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.special_token_pattern = re.compile("|".join(re.escape(t) for t in special_tokens(tokenizer)))

    def check_special_tokens(self, example: Mapping[str, Any]) -> None:
        """DataError (kind "field") naming the first user-text field that contains a special token, and the token."""
        for field, text in user_texts(example):
            match = self.special_token_pattern.search(text)
            if match:
                raise DataError(
                    f"{example_location(example)}: field {field!r}: contains the special token {match.group()!r} "
                    f"at character {match.start()}; in a prompt or target it would act as that control token, so "
                    "special tokens are not allowed in data text",
                    kind="field",
                )

    def encode(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """Token ids and pixels of one validated example; DataError for a bad one.

        Returns `prompt_ids` int32 [t], `pixel_values` float32 [p, patch_dim] or None, `image_grid_thw`
        int64 [k, 3], `target_ids` int32 [n] (with targets) and `meta` (`example_metadata`).
        """
        cfg = self.config
        where = example_location(example)
        images = list(example.get("images", ()))
        if images and self.image_processor is None:
            raise DataError(f"{where}: field 'images': the model is text-only but the example has images")
        self.check_special_tokens(example)
        try:
            messages = prompts.prompt_messages(example, cfg.prompt_style, with_caption=cfg.with_caption)
            target = prompts.target_text(example, cfg.prompt_style) if cfg.with_targets else None
        except DataError:
            raise
        except ExampleError as error:
            raise DataError(str(error), kind="field") from None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pixel_values, grid = None, np.zeros((0, 3), np.int64)
        if images:
            try:
                vision = self.image_processor(images)
            except ValueError as error:  # e.g. an extreme aspect ratio
                raise DataError(f"{where}: field 'images': {error}", kind="bad_image") from None
            pixel_values, grid = vision["pixel_values"], vision["image_grid_thw"]
            counts = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
            text = expand_image_placeholders(text, IMAGE_TOKEN, counts)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > cfg.max_prompt_length:
            raise DataError(
                f"{where}: prompt has {len(prompt_ids)} tokens (images included) > data.max_prompt_length="
                f"{cfg.max_prompt_length}",
                kind="too_long",
            )
        out = {
            "prompt_ids": np.asarray(prompt_ids, np.int32),
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "meta": example_metadata(example, cfg.keep_images),
        }
        if target is not None:
            target_ids = self.tokenizer(target + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            if len(target_ids) > cfg.max_target_length:
                raise DataError(
                    f"{where}: target has {len(target_ids)} tokens > data.max_target_length={cfg.max_target_length}",
                    kind="too_long",
                )
            out["target_ids"] = np.asarray(target_ids, np.int32)
        return out

    def __call__(self, example: Any) -> dict[str, Any] | Skipped:
        """Encode, with bad records (also those the source failed to read) raised or turned into `Skipped`.

        Any other exception while encoding one record is a safety net's DataError (kind "field") that keeps the
        original type and message: the checks before should have named the field, and the test suite's fuzzing
        asserts that they do.
        """
        if isinstance(example, Skipped):
            return example
        try:
            try:
                return self.encode(example)
            except DataError:
                raise
            except Exception as error:
                raise DataError(
                    f"{example_location(example)}: unexpected {type(error).__name__} encoding the record: "
                    f"{brief_text(str(error))}",
                    kind="field",
                ) from error
        except DataError as error:
            if self.config.on_error == "skip":
                return Skipped(error.kind, str(error))
            raise


class _SafeSource:
    """Wraps a source so a record that fails to load becomes `Skipped` (on_error="skip") or raises."""

    def __init__(self, source, on_error: str):
        self.source = source
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except DataError as error:
            if self.on_error == "skip":
                return Skipped(error.kind, str(error))
            raise

    def __repr__(self) -> str:
        return f"_SafeSource({self.source!r}, on_error={self.on_error!r})"


# ----------------------------------------------------------------------------------------------------------
# Skip counting (an iterator stage with its own checkpointable state)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StreamTail:
    """The last element of a counting stream that ended with skipped records after its last usable one."""

    counts: dict[str, int]
    last_message: str


class _SkipCountingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int | None = None):
        super().__init__(parent)
        self._pending = dict.fromkeys(SKIP_KINDS, 0)  # skipped since the last element handed out
        self._last_message = ""
        self._max_consecutive = max_consecutive
        self._ended = False

    def __next__(self):
        while True:
            if self._ended:
                raise StopIteration
            try:
                element = next(self._parent)
            except StopIteration:
                self._ended = True
                if not any(self._pending.values()):
                    raise
                # Records skipped after the last usable one: handed on to the batching stage, which counts them.
                tail, self._pending = _StreamTail(self._pending, self._last_message), dict.fromkeys(SKIP_KINDS, 0)
                return tail
            if isinstance(element, Skipped):
                self._pending[element.kind] = self._pending.get(element.kind, 0) + 1
                self._last_message = element.message
                skipped = sum(self._pending.values())
                if self._max_consecutive is not None and skipped >= self._max_consecutive:
                    # No usable record in two passes over the data: with repeat(None) this would spin forever,
                    # so stop and say why.
                    raise DataError(
                        f"data: {skipped} records in a row were skipped ({_nonzero(self._pending)}), two passes "
                        f"over the data with no usable record; the last one: {element.message}",
                        element.kind,
                    )
                continue
            skipped, self._pending = self._pending, dict.fromkeys(SKIP_KINDS, 0)
            return {**element, "skipped": skipped}

    def get_state(self):
        # Between two `next` calls nothing is pending, so the parent's position is the whole state.
        return {"parent": self._parent.get_state()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = dict.fromkeys(SKIP_KINDS, 0)
        self._ended = False


def _nonzero(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items() if n) or "none"


class SkipCounting(grain.IterDataset):
    """Drops `Skipped` elements; each element carries `skipped`, the per-kind count dropped just before it.

    Counts are deltas rather than running totals so they stay right when grain worker processes each run a
    copy of this stage: the consumer sums them over batches (`add_skip_counts`). `max_consecutive` (two passes over
    the records) turns "every record is bad" into a DataError instead of an endless loop. A stream that ends with
    skipped records ends with a `_StreamTail` carrying their counts (for `TailBatcher`).
    """

    def __init__(self, parent, max_consecutive: int | None = None):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self):
        return _SkipCountingIterator(self._parent.__iter__(), self._max_consecutive)


class TailBatcher:
    """grain `batch_fn` (the batch is built with drop_remainder=False): rows -> `collator(rows)`, or, at the end of a
    stream, a *tail* `{"tail": {...}, "skipped": counts}` instead of a batch: when the rows are a remainder that
    `drop_remainder` drops, or only `_StreamTail`s. Tails carry the skip counts of the stream's end (the tail's own
    and the dropped rows'); `StreamEnd` folds them into the last batch. Picklable for grain workers."""

    def __init__(self, collator, batch_size: int, drop_remainder: bool):
        self.collator = collator
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder

    def __call__(self, rows: Sequence[Any]) -> dict[str, Any]:
        ends = [row for row in rows if isinstance(row, _StreamTail)]
        good = [row for row in rows if not isinstance(row, _StreamTail)]
        counts = _sum_counts(end.counts for end in ends)
        if good and (len(good) == self.batch_size or not self.drop_remainder):
            batch = self.collator(good)
            batch["skipped"] = _sum_counts([batch["skipped"], counts])
            return batch
        return {
            "tail": {"dropped_rows": len(good), "last_skip": ends[-1].last_message if ends else ""},
            "skipped": _sum_counts([counts, *(row.get("skipped", {}) for row in good)]),
        }


class _StreamEndIterator(grain.DatasetIterator):
    """Hands out the parent's batches one behind, so that at the end of the stream the tails' counts join the last
    batch; raises DataError at the end of a stream that handed out no batch while records were skipped."""

    def __init__(self, parent: grain.DatasetIterator, describe: str, batch_size: int):
        super().__init__(parent)
        self._describe, self._batch_size = describe, batch_size
        self._reset(batches_out=0)

    def _reset(self, batches_out: int) -> None:
        self._held = None  # the next batch to hand out (read, its stream-end tails not yet known)
        self._held_state = None  # the parent's state before `_held` was read
        self._orphan = dict.fromkeys(SKIP_KINDS, 0)  # tail counts read before any batch
        self._dropped_rows, self._last_skip = 0, ""
        self._batches_out = batches_out
        self._ended = False

    def _read(self) -> tuple[dict | None, Any]:
        """(the parent's next batch, its state before that batch), tails folded in on the way; (None, _) at the end."""
        while True:
            state = self._parent.get_state()
            try:
                batch = next(self._parent)
            except StopIteration:
                return None, state
            if "tail" not in batch:
                if any(self._orphan.values()):
                    batch["skipped"] = _sum_counts([batch["skipped"], self._orphan])
                    self._orphan = dict.fromkeys(SKIP_KINDS, 0)
                return batch, state
            self._dropped_rows += batch["tail"]["dropped_rows"]
            self._last_skip = batch["tail"]["last_skip"] or self._last_skip
            if self._held is not None:
                self._held["skipped"] = _sum_counts([self._held["skipped"], batch["skipped"]])
            else:
                self._orphan = _sum_counts([self._orphan, batch["skipped"]])

    def __next__(self):
        if self._ended:
            raise StopIteration
        if self._held is None:
            self._held, self._held_state = self._read()
            if self._held is None:
                self._ended = True
                self._raise_if_all_skipped()
                raise StopIteration
        following, state = self._read()
        batch = self._held
        self._held, self._held_state = following, state
        self._ended = following is None
        self._batches_out += 1
        return batch

    def _raise_if_all_skipped(self) -> None:
        if self._batches_out or not any(self._orphan.values()):
            return
        usable = (
            f"{self._dropped_rows} usable records, fewer than one batch of {self._batch_size}"
            if self._dropped_rows
            else "no usable record"
        )
        raise DataError(
            f"data: the stream ended with {usable}: {sum(self._orphan.values())} records were skipped "
            f"({_nonzero(self._orphan)}) in {self._describe}; the last one: {self._last_skip}",
            max(self._orphan, key=self._orphan.get),
        )

    def get_state(self):
        parent = self._held_state if self._held is not None else self._parent.get_state()
        return {"pipeline": parent, "stream_end": {"batches_out": self._batches_out}}

    def set_state(self, state):
        if "stream_end" not in state:  # a state saved before this stage existed: the pipeline's own
            self._parent.set_state(state)
            self._reset(batches_out=1)
            return
        self._parent.set_state(state["pipeline"])
        self._reset(batches_out=int(state["stream_end"]["batches_out"]))


class StreamEnd(grain.IterDataset):
    """The pipeline's last stage, after prefetching: batches pass through one behind (see `_StreamEndIterator`), so
    that records skipped after the last batch are counted in it, and a stream with no usable record is an error."""

    def __init__(self, parent, describe: str, batch_size: int):
        super().__init__(parent)
        self._describe, self._batch_size = describe, batch_size

    def __iter__(self):
        return _StreamEndIterator(self._parent.__iter__(), self._describe, self._batch_size)


# ----------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------


def completion_positions(prompt_position_ids: np.ndarray, completion_width: int) -> np.ndarray:
    """M-RoPE positions [3, B, N] of completion tokens: each row continues at its prompt's max position + 1.

    This is what `get_rope_index` gives text after the prompt, and what the sampler uses when it decodes.
    """
    start = prompt_position_ids.max(axis=(0, 2)) + 1  # [B]
    positions = start[:, None] + np.arange(completion_width)[None, :]
    return np.broadcast_to(positions[None], (3, *positions.shape)).astype(np.int32)


class BatchCollator:
    """A list of encoded examples -> one static-shape batch (numpy), see `collate`."""

    def __init__(self, config: PipelineConfig, *, pad_token_id: int, image_token_id: int, vision_config=None):
        self.config = config
        self.pad_token_id = int(pad_token_id)
        self.image_token_id = int(image_token_id)
        self.vision_config = vision_config

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.collate(rows)

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch of B rows. Keys:

        prompts: model inputs for the sampler — `input_ids` int32 [B, T] (left-padded), `attention_mask` [B, T],
          `position_ids` int32 [3, B, T], `rope_deltas` int32 [B, 1]; with images also `pixel_values` float32
          [N, patch_dim] (the rows' images one after the other, processor order) and `image_grid_thw` int64
          [num_images, 3]; `sampling.prepare_prompts` lays them out in image slots for the device.
        targets (with_targets): `completion_ids` int32 [B, N] (right-padded with pad), `completion_mask` [B, N],
          `position_ids` int32 [3, B, T + N] for the prompt|completion training layout (`train_steps`).
        examples: B metadata dicts (for rewards and evaluation); skipped: records dropped (per kind) while this
          batch was read — sum them over batches with `add_skip_counts`.
        """
        cfg = self.config
        lengths = [len(row["prompt_ids"]) for row in rows]
        width = _bucket(max(lengths), cfg.prompt_buckets, "prompt length", floor=16)
        if not cfg.prompt_buckets:
            width = min(width, cfg.max_prompt_length)
        input_ids, attention_mask = pad_sequences(
            [row["prompt_ids"].tolist() for row in rows], self.pad_token_id, padding_side="left", length=width
        )
        pixels = [row["pixel_values"] for row in rows if row["pixel_values"] is not None]
        grids = [row["image_grid_thw"] for row in rows if len(row["image_grid_thw"])]
        prompts_out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixels:
            vc = self.vision_config
            grid = np.concatenate(grids).astype(np.int64)
            patches = np.concatenate(pixels).astype(np.float32)
            position_ids, rope_deltas = get_rope_index(
                input_ids,
                attention_mask,
                grid,
                image_token_id=self.image_token_id,
                spatial_merge_size=vc.spatial_merge_size,
            )
            prompts_out.update(
                position_ids=np.asarray(position_ids, np.int32),
                rope_deltas=np.asarray(rope_deltas, np.int32),
                pixel_values=patches,
                image_grid_thw=grid,
            )
        else:
            prompts_out["position_ids"] = np.broadcast_to(
                text_position_ids(attention_mask)[None], (3, *input_ids.shape)
            ).astype(np.int32)
            prompts_out["rope_deltas"] = np.zeros((len(rows), 1), np.int32)
        batch = {
            "prompts": prompts_out,
            "examples": [row["meta"] for row in rows],
            "skipped": _sum_counts(row.get("skipped", {}) for row in rows),
        }
        if cfg.with_targets:
            completion_ids, completion_mask = pad_sequences(
                [row["target_ids"].tolist() for row in rows],
                self.pad_token_id,
                padding_side="right",
                length=cfg.max_target_length,
            )
            completion = completion_positions(prompts_out["position_ids"], cfg.max_target_length)
            batch["targets"] = {
                "completion_ids": completion_ids,
                "completion_mask": completion_mask,
                "position_ids": np.concatenate([prompts_out["position_ids"], completion], axis=-1),
            }
        return batch


def sft_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The row fields of the prompt|completion training layout of `train_steps` (`sft_step`, DyME reference rows)
    for a batch built with `with_targets=True`: prompt_ids, prompt_mask, completion_ids, completion_mask,
    position_ids [3, B, T+N]. The images go in per micro-batch (`batching.microbatches`, `pixels_per_row`)."""
    if "targets" not in batch:
        raise ValueError("this batch has no targets: build the pipeline with data.with_targets=True")
    p, t = batch["prompts"], batch["targets"]
    return {
        "prompt_ids": p["input_ids"],
        "prompt_mask": p["attention_mask"],
        "completion_ids": t["completion_ids"],
        "completion_mask": t["completion_mask"],
        "position_ids": t["position_ids"],
    }


# ----------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------


def _process_grid() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def build_dataset(
    sources: Sequence[Any],
    config: PipelineConfig,
    encoder: ExampleEncoder,
    collator: BatchCollator,
    *,
    weights: Sequence[float] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The whole pipeline as a grain `IterDataset`; `iter(...)` gives a checkpointable iterator of batches.

    sources: random-access sources (`GymSource`, `JsonlSource`, a tfds `as_data_source`, a list of examples).
    weights: mixing proportions when there are several sources (default uniform).
    """
    if not sources:
        raise ValueError("no data sources configured")
    if weights is not None and (len(weights) != len(sources) or any(w <= 0 for w in weights)):
        raise ValueError(f"data weights {weights} must be {len(sources)} positive numbers, one per source")
    if process_index is None or process_count is None:
        process_index, process_count = _process_grid()
    datasets = []
    for k, source in enumerate(sources):
        if len(source) == 0:
            raise ValueError(f"data source {k} ({source!r}) is empty")
        ds = grain.MapDataset.source(_SafeSource(source, config.on_error))
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed + k)
        datasets.append(ds)
    if len(datasets) == 1:
        ds = datasets[0].repeat(config.num_epochs)
    else:
        ds = grain.MapDataset.mix([d.repeat(None) for d in datasets], weights)
        if config.num_epochs is not None:
            share = (weights[0] / sum(weights)) if weights else 1 / len(sources)
            ds = ds[: math.ceil(config.num_epochs * len(sources[0]) / share)]
    if config.shard_by_process and process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.map(encoder)
    threads = max(1, config.num_threads)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads * 4))
    # Two passes over every source (in the mixed stream, as this process sees it) without one usable record means
    # none is usable: one good record per shuffled pass can still leave 2 x (pass - 1) bad ones in a row.
    shares = [w / sum(weights) for w in weights] if weights else [1 / len(sources)] * len(sources)
    period = max(len(source) / share for source, share in zip(sources, shares))
    readers = process_count if config.shard_by_process and process_count > 1 else 1
    it = SkipCounting(it, max_consecutive=math.ceil(2 * period / readers) + 1)
    # drop_remainder is TailBatcher's: grain's own would drop the remainder's skip counts with its rows.
    batcher = TailBatcher(collator, config.batch_size, config.drop_remainder)
    it = it.batch(config.batch_size, drop_remainder=False, batch_fn=batcher)
    if config.worker_processes > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside `app.run` take the defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_processes))
    elif config.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
    return StreamEnd(it, ", ".join(repr(source) for source in sources), config.batch_size)


def _sum_counts(counts) -> dict[str, int]:
    total = dict.fromkeys(SKIP_KINDS, 0)
    for c in counts:
        for kind, n in c.items():
            total[kind] = total.get(kind, 0) + int(n)
    return total


def add_skip_counts(totals: Mapping[str, int] | None, batch: Mapping[str, Any]) -> dict[str, int]:
    """Running totals of skipped records after `batch` (keep them with the data state when checkpointing)."""
    return _sum_counts([totals or {}, batch.get("skipped", {})])


def skip_metrics(totals: Mapping[str, int]) -> dict[str, float]:
    """`data/skipped/<kind>` and `data/skipped` (all kinds) from running totals, for the metrics writer."""
    out = {f"data/skipped/{kind}": float(totals.get(kind, 0)) for kind in SKIP_KINDS}
    out["data/skipped"] = float(sum(totals.values()))
    return out
