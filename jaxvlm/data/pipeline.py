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
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from jaxvlm.data import prompts
from jaxvlm.data.example import ExampleError, example_location
from jaxvlm.data.jsonl import DataError
from jaxvlm.processing.image import ImageProcessor
from jaxvlm.processing.processor import expand_image_placeholders, pad_sequences
from jaxvlm.processing.rope import get_rope_index, text_position_ids

ON_ERROR_CHOICES = ("raise", "skip")
SKIP_KINDS = ("parse", "field", "missing_image", "bad_image", "too_long")
IMAGE_TOKEN = "<|image_pad|>"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples become batches. `batch_size` is the number of rows this process produces per batch."""

    batch_size: int
    prompt_style: str = "r1"  # r1 | dyme | plain (jaxvlm.data.prompts)
    with_caption: bool = False  # prepend "Caption: ..." (Infi-MMR phase 2)
    with_targets: bool = False  # also tokenize the reference completion (SFT, DyME memorisation rows)
    max_prompt_length: int = 512  # tokens, image tokens included; longer prompts are bad records
    max_target_length: int = 256  # tokens incl. end-of-turn; also the static completion width
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
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.prompt_style not in prompts.PROMPT_STYLES:
            raise ValueError(f"data.prompt_style must be one of {prompts.PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
        if self.max_prompt_length < 1 or self.max_target_length < 1:
            raise ValueError("data.max_prompt_length and data.max_target_length must be >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs must be >= 1 or None, got {self.num_epochs}")
        buckets = self.prompt_buckets
        if list(buckets) != sorted(set(buckets)) or any(b < 1 for b in buckets):
            raise ValueError(f"data.prompt_buckets must be strictly increasing positive ints, got {buckets}")
        if self.prompt_buckets and self.prompt_buckets[-1] < self.max_prompt_length:
            raise ValueError(
                f"data.prompt_buckets' largest entry {self.prompt_buckets[-1]} must be >= "
                f"max_prompt_length={self.max_prompt_length}"
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
            values["prompt_buckets"] = tuple(int(x) for x in values["prompt_buckets"])
        return cls(**values)


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


class ExampleEncoder:
    """example dict -> token ids + pixels (or `Skipped`); picklable, so grain workers can run it."""

    def __init__(self, tokenizer, image_processor: ImageProcessor | None, config: PipelineConfig):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template; jaxvlm renders prompts with it")
        ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{IMAGE_TOKEN!r} is not a single token of the tokenizer (encodes to {ids})")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token ('<|im_end|>' for Qwen); targets end with it")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config

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
        """Encode, with bad records (also those the source failed to read) raised or turned into `Skipped`."""
        try:
            if isinstance(example, Skipped):
                return example
            return self.encode(example)
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


class _SkipCountingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int | None = None):
        super().__init__(parent)
        self._pending = dict.fromkeys(SKIP_KINDS, 0)  # skipped since the last element handed out
        self._max_consecutive = max_consecutive

    def __next__(self):
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if any(self._pending.values()):
                    logging.warning("data: %s records skipped after the last complete batch", self._pending)
                raise
            if isinstance(element, Skipped):
                self._pending[element.kind] = self._pending.get(element.kind, 0) + 1
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


def _nonzero(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items() if n)


class SkipCounting(grain.IterDataset):
    """Drops `Skipped` elements; each element carries `skipped`, the per-kind count dropped just before it.

    Counts are deltas rather than running totals so they stay right when grain worker processes each run a
    copy of this stage: the consumer sums them over batches (`add_skip_counts`). `max_consecutive` (two passes over
    the records) turns "every record is bad" into a DataError instead of an endless loop.
    """

    def __init__(self, parent, max_consecutive: int | None = None):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self):
        return _SkipCountingIterator(self._parent.__iter__(), self._max_consecutive)


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
    it = it.batch(config.batch_size, drop_remainder=config.drop_remainder, batch_fn=collator)
    if config.worker_processes > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside `app.run` take the defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_processes))
    elif config.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
    return it


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
