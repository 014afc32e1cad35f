"""Host-side (numpy) multimodal RoPE position ids for Qwen2.5-VL and Qwen3-VL.

Qwen2.5-VL rotates queries/keys with three position streams (temporal,
height, width).  Text tokens use the same running position on all three
axes; the `<|image_pad|>` tokens of an image get a `(t, h, w)` grid of
positions that starts at the running position, after which the running
position advances by `max(h, w) // merge`.  This is a numpy port of
`Qwen2_5_VLModel.get_rope_index` (transformers 5.x, images only), computed once
per batch on the host so the jitted model receives ready-made position ids.

`Qwen3VLModel.get_rope_index` gives the same positions and deltas for images:
the two differ only for videos (Qwen3-VL splits a video into one t = 1 grid per
frame, timestamps in the text between them, where Qwen2.5-VL spaces frames by
`tokens_per_second`); a still image has t = 1, where the rules agree.  How the
model rotates by these positions (Qwen3-VL interleaves the t/h/w frequencies of
`mrope_section`) is the model's business, not this module's.  One departure
from both: transformers cuts image tokens into images at non-image tokens only,
so it fails on back-to-back images with nothing between them (a size-mismatch
error); here a run of image tokens is split by the grid sizes.
"""

from __future__ import annotations

import numpy as np


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions `0..n-1` over each row's valid tokens, 0 at padding.

    attention_mask: `[B, T]` (1 = token, 0 = padding, any padding side).
    Returns int32 `[B, T]` (`cumsum(mask) - 1`, zeroed where mask is 0).
    """
    mask = np.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {mask.shape}")
    valid = mask.astype(bool)
    positions = np.cumsum(valid, axis=-1, dtype=np.int64) - 1
    return np.where(valid, positions, 0).astype(np.int32)


def image_mrope_positions(start: int, grid_thw: tuple[int, int, int], spatial_merge_size: int) -> np.ndarray:
    """3-D positions of one image's LLM tokens, int64 `[3, t * (h // m) * (w // m)]`.

    Rows are (temporal, height, width); tokens are enumerated in `(t, h, w)`
    row-major order (`meshgrid(..., indexing="ij")`), all offset by `start`.
    """
    t, h, w = grid_thw
    temporal = np.arange(t) + start
    height = np.arange(h // spatial_merge_size) + start
    width = np.arange(w // spatial_merge_size) + start
    grids = np.meshgrid(temporal, height, width, indexing="ij")
    return np.stack(grids, axis=0).reshape(3, -1)


def _validated_grids(image_grid_thw: np.ndarray | None, spatial_merge_size: int) -> np.ndarray:
    """`image_grid_thw` as int64 `[n, 3]` (empty if None), checking each grid is mergeable."""
    if image_grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    grids = np.asarray(image_grid_thw, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {grids.shape}")
    for index, (t, h, w) in enumerate(grids.tolist()):
        if t < 1 or h < 1 or w < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(
                f"image_grid_thw[{index}] = {[t, h, w]} is invalid: t, h, w must be positive and h, w "
                f"multiples of spatial_merge_size={spatial_merge_size}"
            )
    return grids


def _run_end(values: np.ndarray, start: int) -> int:
    """Index one past the run of values equal to `values[start]` that begins at `start`."""
    changes = np.flatnonzero(values[start:] != values[start])
    return start + int(changes[0]) if changes.size else len(values)


def _row_positions(
    row: int,
    is_image: np.ndarray,
    grids: np.ndarray,
    next_grid: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, int]:
    """Positions `[3, n]` for one row's valid tokens; returns them and the next unused grid index.

    is_image: bool `[n]`, True at image tokens.  A run of image tokens is
    split into consecutive images by the grid sizes, so back-to-back images
    need no separator.
    """
    num_tokens = len(is_image)
    pieces = []
    current = 0
    index = 0
    while index < num_tokens:
        end = _run_end(is_image, index)
        if not is_image[index]:
            pieces.append(np.broadcast_to(np.arange(end - index) + current, (3, end - index)))
            current += end - index
            index = end
            continue
        while index < end:
            remaining = end - index
            if next_grid >= len(grids):
                raise ValueError(
                    f"row {row}: {remaining} image tokens at valid token {index} but all "
                    f"{len(grids)} grids of image_grid_thw are already used"
                )
            t, h, w = (int(v) for v in grids[next_grid])
            needed = t * h * w // spatial_merge_size**2
            if needed > remaining:
                raise ValueError(
                    f"row {row}: {remaining} image tokens but image_grid_thw[{next_grid}] = {[t, h, w]} needs "
                    f"{needed} (run of image tokens at valid tokens {index}..{end - 1})"
                )
            pieces.append(image_mrope_positions(current, (t, h, w), spatial_merge_size))
            current += max(h, w) // spatial_merge_size
            index += needed
            next_grid += 1
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    return positions, next_grid


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids and per-row deltas for a padded batch (numpy).

    input_ids: `[B, T]`.  attention_mask: `[B, T]` (1 = token; padding on
    either side), or None for no padding.  image_grid_thw: `[n, 3]` (t, h, w
    in patches) for all images of the batch, consumed in order row by row.

    Returns `(position_ids, rope_deltas)`: int32 `[3, B, T]` (0 at padding)
    and int32 `[B, 1]` where `rope_deltas[b] = max(position_ids[:, b, valid])
    + 1 - num_valid_tokens(b)` (the offset decoding adds to the cache
    position of newly generated text tokens).  A row with no valid tokens
    gets delta 0.

    Raises ValueError if the image tokens of a row do not match the grids
    (too few / too many tokens, grids left over, or grids missing).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    if attention_mask is None:
        valid = np.ones(ids.shape, dtype=bool)
    else:
        valid = np.asarray(attention_mask).astype(bool)
        if valid.shape != ids.shape:
            raise ValueError(f"attention_mask shape {valid.shape} does not match input_ids shape {ids.shape}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be positive, got {spatial_merge_size}")
    grids = _validated_grids(image_grid_thw, spatial_merge_size)

    batch_size, seq_len = ids.shape
    position_ids = np.zeros((3, batch_size, seq_len), dtype=np.int32)
    rope_deltas = np.zeros((batch_size, 1), dtype=np.int32)
    next_grid = 0
    for row in range(batch_size):
        row_valid = valid[row]
        is_image = ids[row][row_valid] == image_token_id
        positions, next_grid = _row_positions(row, is_image, grids, next_grid, spatial_merge_size)
        position_ids[:, row, row_valid] = positions
        if positions.shape[1]:
            rope_deltas[row, 0] = positions.max() + 1 - positions.shape[1]
    if next_grid != len(grids):
        raise ValueError(
            f"image_grid_thw has {len(grids)} grids but the image tokens of the batch use only {next_grid}"
        )
    return position_ids, rope_deltas
