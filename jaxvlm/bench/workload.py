"""The synthetic batches both sides of a benchmark run on: the same token ids, pixels and image grids.

Every row is one image followed by text: `<vision_start> <image_pad> x n <vision_end> prompt... completion...`,
with no padding (all rows the same length), so the JAX side and transformers agree on positions by construction.
Token ids are drawn below the model's special ids; the pixels are random RGB images of `image_hw` through the model
family's image processor (`processing.image.image_processor_for_model`: Qwen2.5-VL's 14 px patches and CLIP
normalisation, Qwen3-VL's 16 px patches and mean = std = 0.5), so each family gets its own patch layout and value
range.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxvlm import batching
from jaxvlm.models.config import ModelConfig
from jaxvlm.processing.image import image_processor_for_model
from jaxvlm.processing.rope import get_rope_index


@dataclasses.dataclass(frozen=True)
class Rows:
    """A batch of B rows (host numpy).

    input_ids int32 [B, S] (prompt then completion), prompt_len P (shared), pixel_values float32 [B * p, patch_dim]
    (p patches per image), image_grid_thw int64 [B, 3], position_ids int32 [3, B, S] (M-RoPE)."""

    input_ids: np.ndarray
    prompt_len: int
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    position_ids: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def row_pixels(self) -> list[batching.RowPixels] | None:
        """Per row: its image's patch rows and grid (for `batching.microbatches`)."""
        if self.pixel_values is None:
            return None
        p = self.pixel_values.shape[0] // self.num_rows
        return [(self.pixel_values[i * p : (i + 1) * p], self.image_grid_thw[i : i + 1]) for i in range(self.num_rows)]


def repeated_pixels(rows: Rows, times: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(pixel_values, image_grid_thw) with each row's image repeated for its `times` rollout rows (prompt-major)."""
    if rows.pixel_values is None:
        return None, None
    p = rows.pixel_values.shape[0] // rows.num_rows
    pixels = np.repeat(rows.pixel_values.reshape(rows.num_rows, p, -1), times, 0)
    return pixels.reshape(-1, rows.pixel_values.shape[-1]), np.repeat(rows.image_grid_thw, times, 0)


def image_tokens(cfg: ModelConfig, image_hw: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(grid [t, h, w] in patches, placeholder tokens) of one image of `image_hw` pixels (multiples of patch_size x
    merge_size: 28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    height, width = image_hw
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise ValueError(f"image size {image_hw} must be positive multiples of patch_size x merge_size = {unit}")
    grid = np.asarray([1, height // v.patch_size, width // v.patch_size], np.int64)
    return grid, int(grid.prod()) // v.merge_unit


def image_pixels(cfg: ModelConfig, image_hw: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random RGB images of `image_hw` pixels through the model family's image processor, which keeps their
    size (a multiple of its resize factor): float32 [count * h * w patches, patch_dim], images in order."""
    height, width = image_hw
    processor = image_processor_for_model(cfg, min_pixels=height * width, max_pixels=height * width)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    out = processor(images)
    grid, _ = image_tokens(cfg, image_hw)
    if not (out["image_grid_thw"] == grid).all() or out["pixel_values"].shape[-1] != cfg.vision.patch_dim:
        raise ValueError(
            f"the {cfg.model_type} image processor made grids {out['image_grid_thw'][0].tolist()} x "
            f"{out['pixel_values'].shape[-1]} of a {image_hw} image; the model expects {grid.tolist()} x "
            f"{cfg.vision.patch_dim}"
        )
    return out["pixel_values"].astype(np.float32)


def make_rows(
    cfg: ModelConfig, rows: int, seq_len: int, completion_len: int, image_hw: tuple[int, int] | None, seed: int = 0
) -> Rows:
    """`rows` rows of `seq_len` tokens whose last `completion_len` are the completion (`completion_len` 0: prompts
    only, for rollouts). With `image_hw`, each row starts with one image of that many pixels."""
    rng = np.random.default_rng(seed)
    special = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    high = min([cfg.text.vocab_size, *special])
    prefix: list[int] = []
    grid = None
    if image_hw is not None:
        if cfg.vision is None:
            raise ValueError("image_hw is set but the model has no vision tower")
        grid, n = image_tokens(cfg, image_hw)
        prefix = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    text = seq_len - len(prefix)
    if text <= completion_len:
        raise ValueError(
            f"seq_len {seq_len} leaves {text} text tokens after the image's {len(prefix)}: need more than "
            f"completion_len {completion_len}"
        )
    ids = np.concatenate(
        [
            np.broadcast_to(np.asarray(prefix, np.int32), (rows, len(prefix))),
            rng.integers(0, high, (rows, text)).astype(np.int32),
        ],
        axis=1,
    )
    mask = np.ones_like(ids)
    pixel_values = grids = None
    if grid is not None:
        grids = np.broadcast_to(grid, (rows, 3)).copy()
        pixel_values = image_pixels(cfg, image_hw, rows, rng)
        position_ids, _ = get_rope_index(
            ids, mask, grids, image_token_id=cfg.image_token_id, spatial_merge_size=cfg.vision.spatial_merge_size
        )
    else:
        position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (3, rows, seq_len))
    return Rows(ids, seq_len - completion_len, pixel_values, grids, np.asarray(position_ids, np.int32))


def sft_microbatches(cfg: ModelConfig, rows: Rows, micro_batches: int, slot_multiple: int = 1) -> dict:
    """`rows` as `[M, b, ...]` micro-batches for `train_steps.sft_step` (loss on the completion tokens); image
    slots a multiple of `slot_multiple` (the data-parallel size)."""
    p = rows.prompt_len
    fields = {
        "prompt_ids": rows.input_ids[:, :p],
        "prompt_mask": np.ones_like(rows.input_ids[:, :p]),
        "completion_ids": rows.input_ids[:, p:],
        "completion_mask": np.ones_like(rows.input_ids[:, p:]),
        "position_ids": rows.position_ids,
    }
    return batching.microbatches(
        fields, (micro_batches,), row_pixels=rows.row_pixels(), vision_config=cfg.vision, slot_multiple=slot_multiple
    )


def grpo_update_batch(
    cfg: ModelConfig,
    rows: Rows,
    inputs: dict,
    rollout,
    num_generations: int,
    micro_batches: int,
    slot_multiple: int = 1,
) -> tuple[dict, dict]:
    """The GRPO update's rows [R, ...] and their `[1, M, b, ...]` batch, from a host rollout of `rows`' prompts
    (`inputs`: their `sampling.prepare_prompts`), assembled by the trainer's own `rollouts.grpo_update_batch` with
    `token_parity_reward`'s group advantages, each prompt's image shared by its G rows."""
    from jaxvlm import rollouts, sampling

    g = num_generations
    rewards = token_parity_reward(np.asarray(rollout.tokens), np.asarray(rollout.mask))
    row_pixels = rows.row_pixels()
    return rollouts.grpo_update_batch(
        sampling.update_rows(inputs, rollout, g),
        rewards,
        g,
        "group",
        (1, micro_batches),
        row_pixels=None if row_pixels is None else batching.repeat_rows(row_pixels, g),
        vision_config=cfg.vision,
        slot_multiple=slot_multiple,
    )


def image_hw(value) -> tuple[int, int] | None:
    """A config's `image_hw`: None (or empty) for text-only rows, else (height, width)."""
    return None if value is None or not len(value) else tuple(int(x) for x in value)


def prompt_batch(rows: Rows) -> dict:
    """The prompt batch `sampling.generate` takes (a processor's output form)."""
    out = {"input_ids": rows.input_ids, "attention_mask": np.ones_like(rows.input_ids)}
    if rows.pixel_values is not None:
        out.update(pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw)
    return out


def token_parity_reward(completion_ids: np.ndarray, completion_mask: np.ndarray) -> np.ndarray:
    """A verifiable reward both sides compute the same way on the host: the share of even token ids in each
    completion, float32 [R]. (Benchmarks measure compute; what the reward rewards does not matter, only that it
    varies within groups so advantages are not all zero.)"""
    mask = completion_mask.astype(np.float32)
    even = (completion_ids % 2 == 0).astype(np.float32)
    return (even * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)
