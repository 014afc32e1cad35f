"""Host-side assembly of training batches: rows -> `[*leading, b, ...]` micro-batches with their own images.

The steps in `jaxvlm.train_steps` take SFT batches `[M, b, ...]` and GRPO/DyME batches `[K, M, b, ...]`, where each
micro-batch carries the pixels of its own rows in image slots (`pixel_values [S, L, patch_dim]` plus the vision
tower's index arrays, see `jaxvlm.processing.vision`). This module cuts a flat batch of R rows into that layout:

* row fields `[R, ...]` become `[*leading, b, ...]`, `position_ids [3, R, S]` becomes `[*leading, 3, b, S]`;
* each micro-batch gets its rows' distinct images, laid out in S slots of L patches shared by all micro-batches
  (buckets, so shapes are static). A prompt's images, repeated for its G rollout rows, are encoded once per
  micro-batch: the rows point at the same features (`image_offset [*leading, b]`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxvlm.processing.vision import slot_shape, vision_layout

RowPixels = tuple[np.ndarray, np.ndarray]  # (pixel rows [p, patch_dim], grid [k, 3]) of one row's images


def pixels_per_row(prompts: Mapping[str, Any], images_per_row: Sequence[int]) -> list[RowPixels]:
    """Split a pipeline batch's concatenated `pixel_values` / `image_grid_thw` into each row's images.

    images_per_row: number of images of each row (`example["num_images"]`), in row order.
    """
    grid = np.asarray(prompts.get("image_grid_thw", np.zeros((0, 3), np.int64))).reshape(-1, 3)
    if sum(images_per_row) != len(grid):
        raise ValueError(f"rows have {sum(images_per_row)} images but image_grid_thw lists {len(grid)}")
    pixels = prompts.get("pixel_values")
    patch_dim = 0 if pixels is None else pixels.shape[-1]
    out, image, patch = [], 0, 0
    for count in images_per_row:
        row_grid = grid[image : image + count]
        n = int(row_grid.prod(-1).sum()) if count else 0
        row_pixels = pixels[patch : patch + n] if n else np.zeros((0, patch_dim), np.float32)
        out.append((row_pixels, row_grid))
        image, patch = image + count, patch + n
    return out


def microbatches(
    rows: Mapping[str, np.ndarray],
    leading: tuple[int, ...],
    *,
    row_pixels: Sequence[RowPixels] | None = None,
    vision_config=None,
    slot_multiple: int = 1,
) -> dict[str, Any]:
    """Cut R rows into `leading + (b,)` with b = R / prod(leading), attaching each micro-batch's images.

    rows: fields with the row axis first (`[R, ...]`), except `position_ids [3, R, S]`.
    row_pixels: per row, its images' pixels and grid (see `pixels_per_row`; `repeat_rows` repeats a prompt's for
      its rollout rows, and repeated entries are encoded once), or None for text-only batches. A micro-batch
      without any image gets all-padding slots so shapes stay static.
    slot_multiple: the data-parallel size: the slot count is a multiple of it, so slots split over devices.
    Returns the reshaped fields plus, when there are images, `pixel_values [*leading, S, L, patch_dim]`,
    `vision_inputs` (each array with the leading axes prepended) and `image_offset [*leading, b]`.
    """
    num_rows = (
        rows["completion_ids"].shape[0]
        if "completion_ids" in rows
        else next(v.shape[0] for k, v in rows.items() if k != "position_ids")
    )
    groups = int(np.prod(leading))
    if num_rows % groups:
        raise ValueError(f"{num_rows} rows cannot be cut into {leading} micro-batches of equal size")
    b = num_rows // groups
    out: dict[str, Any] = {}
    for key, value in rows.items():
        value = np.asarray(value)
        if key == "position_ids":
            three, _, s = value.shape
            out[key] = value.reshape(three, *leading, b, s).transpose(
                *range(1, len(leading) + 1), 0, len(leading) + 1, len(leading) + 2
            )
        else:
            out[key] = value.reshape(*leading, b, *value.shape[1:])
    if row_pixels is None or not any(len(grid) for _, grid in row_pixels):
        return out
    if len(row_pixels) != num_rows:
        raise ValueError(f"row_pixels has {len(row_pixels)} entries for {num_rows} rows")
    vc = vision_config
    patch_dim = next(p.shape[-1] for p, grid in row_pixels if len(grid))
    chunks = [_unique_images(row_pixels[i * b : (i + 1) * b], vc.merge_unit) for i in range(groups)]
    grids = [np.concatenate([g for _, g in images]) if images else np.zeros((0, 3), np.int64) for images, _ in chunks]
    slot_len = max(slot_shape(g, vc)[1] for g in grids)  # one (S, L) shared by the micro-batches: static shapes
    num_slots = max(slot_shape(g, vc, slot_multiple=slot_multiple, slot_len=slot_len)[0] for g in grids)
    pixel_values, index_arrays = [], []
    for (images, _), grid in zip(chunks, grids):
        layout = vision_layout(grid, vc, num_slots=num_slots, slot_len=slot_len)
        pixels = np.concatenate([p for p, _ in images]) if images else np.zeros((0, patch_dim), np.float32)
        pixel_values.append(layout.pixels(pixels))
        index_arrays.append(layout.inputs())
    out["pixel_values"] = np.stack(pixel_values).reshape(*leading, num_slots, slot_len, patch_dim)
    out["vision_inputs"] = {
        key: np.stack([arrays[key] for arrays in index_arrays]).reshape(*leading, *index_arrays[0][key].shape)
        for key in index_arrays[0]
    }
    out["image_offset"] = np.asarray([o for _, offsets in chunks for o in offsets], np.int32).reshape(*leading, b)
    return out


def _unique_images(rows: Sequence[RowPixels], merge_unit: int) -> tuple[list[RowPixels], list[int]]:
    """The distinct images of a micro-batch's rows (the same arrays repeated for a prompt's rollout rows count
    once, by identity) and each row's `image_offset`: where its images' merged features start among them."""
    images: list[RowPixels] = []
    start: dict[tuple[int, int], int] = {}
    offsets, merged = [], 0
    for pixels, grid in rows:
        if not len(grid):
            offsets.append(0)
            continue
        key = (id(pixels), id(grid))
        if key not in start:
            start[key] = merged
            images.append((pixels, np.asarray(grid, np.int64).reshape(-1, 3)))
            merged += int(np.asarray(grid).reshape(-1, 3).prod(-1).sum()) // merge_unit
        offsets.append(start[key])
    return images, offsets


def repeat_rows(row_pixels: Sequence[RowPixels], times: int) -> list[RowPixels]:
    """Each prompt's images repeated for its `times` rollout rows (prompt-major: row b*G + g is prompt b)."""
    return [entry for entry in row_pixels for _ in range(times)]
