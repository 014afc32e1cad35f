"""Host-side vision metadata for the Qwen2.5-VL vision tower.

Everything here depends only on `image_grid_thw` and the vision config, so it is computed with numpy on the host
and shipped to the device as plain int32 arrays of static shape. Inside jit the tower then needs no data-dependent
shapes: window attention and per-image attention become segment-id masks, and the window permutation and its
inverse become gathers.

Vocabulary (N = number of patches, M = N / merge_unit merged tokens):
* processor order: patches as `pixel_values` holds them (image by image, 2x2 merge units contiguous);
* window order: merge units regrouped so that each attention window is contiguous (transformers'
  `get_vision_window_index`), which is the order the transformer blocks run in.
"""

from __future__ import annotations

import numpy as np

VISION_INPUT_KEYS = ("patch_order", "rotary_pos", "full_segment_ids", "window_segment_ids", "merge_inverse")


def _as_grid(image_grid_thw) -> np.ndarray:
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"image_grid_thw must be positive, got {grid.tolist()}")
    return grid


def vision_window_index(image_grid_thw, *, spatial_merge_size: int, window_merged: int):
    """Merged-token permutation that makes attention windows contiguous (transformers' `get_vision_window_index`).

    Args:
      image_grid_thw: [n, 3] (t, h, w) patch grid per image.
      spatial_merge_size: side of a merge unit in patches (2).
      window_merged: window side in merged tokens (window_size // merge // patch; 4 for Qwen2.5-VL).
    Returns:
      window_index: int64 [M], merged tokens in window order, as indexes into processor order.
      window_sizes: int64 [num_windows], merged tokens per (non-empty) window, in window order.
    """
    grid = _as_grid(image_grid_thw)
    window_index, window_sizes, offset = [], [], 0
    m, ws = spatial_merge_size, window_merged
    for t, h, w in grid:
        if h % m or w % m:
            raise ValueError(f"image grid {h}x{w} is not divisible by spatial_merge_size={m}")
        gh, gw = h // m, w // m
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = ws - gh % ws, ws - gw % ws
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
        sizes = (padded >= 0).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat >= 0] + offset)
        window_sizes.append(sizes[sizes > 0])
        offset += t * gh * gw
    return np.concatenate(window_index), np.concatenate(window_sizes)


def vision_rotary_positions(image_grid_thw, *, spatial_merge_size: int) -> np.ndarray:
    """(h, w) patch coordinates in processor order (transformers' `get_vision_position_ids`): int64 [N, 2]."""
    grid = _as_grid(image_grid_thw)
    out, m = [], spatial_merge_size
    for t, h, w in grid:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    return np.concatenate(out)


def num_patches(image_grid_thw) -> int:
    return int(_as_grid(image_grid_thw).prod(-1).sum())


def vision_inputs(image_grid_thw, vision_config, *, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """All static-shape index arrays the vision tower needs, as int32 numpy arrays.

    Args:
      image_grid_thw: [n, 3] patch grid per image, in `pixel_values` order.
      vision_config: a `jaxvlm.models.VisionConfig`.
      pad_to: total patch count to pad to (a bucket size, a multiple of merge_unit), or None for exactly N.
        Padding patches sit at the end, attend only among themselves and are never spliced into the text.
    Returns a dict with (P = padded patch count, Q = P / merge_unit):
      patch_order [P]: window-order patch i is processor-order patch patch_order[i];
      rotary_pos [P, 2]: (h, w) coordinates for the 2-D RoPE, in window order;
      full_segment_ids [P]: one segment per image frame (full-attention blocks), window order;
      window_segment_ids [P]: one segment per attention window, window order;
      merge_inverse [Q]: processor-order merged token j is window-order merged token merge_inverse[j].
    """
    vc = vision_config
    grid = _as_grid(image_grid_thw)
    unit = vc.spatial_merge_size**2
    window_index, window_sizes = vision_window_index(
        grid, spatial_merge_size=vc.spatial_merge_size, window_merged=vc.window_merged
    )
    n = num_patches(grid)
    total = n if pad_to is None else int(pad_to)
    if total < n or total % unit:
        raise ValueError(f"pad_to={pad_to} must be >= {n} patches and a multiple of merge unit {unit}")
    patch_order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
    frames = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
    windows = np.repeat(np.arange(len(window_sizes)), window_sizes * unit)
    rotary = vision_rotary_positions(grid, spatial_merge_size=vc.spatial_merge_size)[patch_order]
    merge_inverse = np.argsort(window_index)

    pad = total - n
    if pad:
        tail = np.arange(n, total)
        patch_order = np.concatenate([patch_order, tail])
        rotary = np.concatenate([rotary, np.zeros((pad, 2), rotary.dtype)])
        merge_inverse = np.concatenate([merge_inverse, np.arange(n // unit, total // unit)])
    full_seg = np.concatenate([frames[patch_order[:n]], np.full(pad, frames.max() + 1)])
    window_seg = np.concatenate([windows, np.full(pad, windows.max() + 1)])
    out = dict(
        patch_order=patch_order,
        rotary_pos=rotary,
        full_segment_ids=full_seg,
        window_segment_ids=window_seg,
        merge_inverse=merge_inverse,
    )
    return {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in out.items()}
