"""Host-side assembly of training batches: rows -> `[*leading, b, ...]` micro-batches with their own images.

The steps in `jaxvlm.train_steps` take SFT batches `[M, b, ...]` and GRPO/DyME batches `[K, M, b, ...]`, where each
micro-batch carries the pixels of its own rows (`pixel_values [P, patch_dim]` plus the vision tower's index
arrays, see `jaxvlm.processing.vision`). This module cuts a flat batch of R rows into that layout:

* row fields `[R, ...]` become `[*leading, b, ...]`, `position_ids [3, R, S]` becomes `[*leading, 3, b, S]`;
* each micro-batch gets the concatenated pixels of its rows' images (a prompt's images are repeated for each of
  its G rollout rows), zero-padded to one patch count P shared by all micro-batches (a bucket, so shapes are static).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxvlm.processing.vision import vision_inputs

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
        row_grid = grid[image: image + count]
        n = int(row_grid.prod(-1).sum()) if count else 0
        row_pixels = pixels[patch: patch + n] if n else np.zeros((0, patch_dim), np.float32)
        out.append((row_pixels, row_grid))
        image, patch = image + count, patch + n
    return out


def patch_bucket(count: int, unit: int, buckets: Sequence[int] = ()) -> int:
    """The padded patch count for `count` patches: the smallest bucket that fits, else the next power of two
    times the merge unit."""
    for bucket in buckets:
        if bucket >= count:
            if bucket % unit:
                raise ValueError(f"patch bucket {bucket} is not a multiple of the merge unit {unit}")
            return bucket
    if buckets:
        raise ValueError(f"{count} patches exceed the largest patch bucket {buckets[-1]}")
    units = max(1, -(-count // unit))
    return (1 << (units - 1).bit_length()) * unit


def microbatches(
    rows: Mapping[str, np.ndarray],
    leading: tuple[int, ...],
    *,
    row_pixels: Sequence[RowPixels] | None = None,
    vision_config=None,
    patch_buckets: Sequence[int] = (),
) -> dict[str, Any]:
    """Cut R rows into `leading + (b,)` with b = R / prod(leading), attaching each micro-batch's images.

    rows: fields with the row axis first (`[R, ...]`), except `position_ids [3, R, S]`.
    row_pixels: per row, its images' pixels and grid (see `pixels_per_row`, repeated per rollout row), or None
      for text-only batches. A micro-batch without any image gets one all-padding image so shapes stay static.
    Returns the reshaped fields plus `pixel_values [*leading, P, patch_dim]` and `vision_inputs` (each array with
    the leading axes prepended) when there are images.
    """
    num_rows = rows["completion_ids"].shape[0] if "completion_ids" in rows else next(
        v.shape[0] for k, v in rows.items() if k != "position_ids")
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
                *range(1, len(leading) + 1), 0, len(leading) + 1, len(leading) + 2)
        else:
            out[key] = value.reshape(*leading, b, *value.shape[1:])
    if row_pixels is None or not any(len(grid) for _, grid in row_pixels):
        return out
    if len(row_pixels) != num_rows:
        raise ValueError(f"row_pixels has {len(row_pixels)} entries for {num_rows} rows")
    vc = vision_config
    unit = vc.spatial_merge_size**2
    patch_dim = next(p.shape[-1] for p, grid in row_pixels if len(grid))
    chunks = [row_pixels[i * b: (i + 1) * b] for i in range(groups)]
    counts = [sum(p.shape[0] for p, _ in chunk) for chunk in chunks]
    total = patch_bucket(max(max(counts), unit), unit, patch_buckets)
    pixel_values, index_arrays = [], []
    for chunk, count in zip(chunks, counts):
        grids = [grid for _, grid in chunk if len(grid)]
        if grids:
            grid = np.concatenate(grids).astype(np.int64)
            pixels = np.concatenate([p for p, g in chunk if len(g)]).astype(np.float32)
        else:  # a text-only micro-batch in an image batch: one dummy image that no token reads
            side = int(np.sqrt(unit))
            grid = np.asarray([[1, side, side]], np.int64)
            pixels, count = np.zeros((unit, patch_dim), np.float32), unit
        pixel_values.append(np.concatenate([pixels, np.zeros((total - count, patch_dim), np.float32)]))
        index_arrays.append(vision_inputs(grid, vc, pad_to=total))
    out["pixel_values"] = np.stack(pixel_values).reshape(*leading, total, patch_dim)
    out["vision_inputs"] = {
        key: np.stack([arrays[key] for arrays in index_arrays]).reshape(*leading, *index_arrays[0][key].shape)
        for key in index_arrays[0]
    }
    return out


def repeat_rows(row_pixels: Sequence[RowPixels], times: int) -> list[RowPixels]:
    """Each prompt's images repeated for its `times` rollout rows (prompt-major: row b*G + g is prompt b)."""
    return [entry for entry in row_pixels for _ in range(times)]
