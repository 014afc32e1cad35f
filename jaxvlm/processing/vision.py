"""Host-side layout of images for the Qwen2.5-VL vision tower: image slots with block-local attention.

Everything here depends only on `image_grid_thw` and the vision config, so it is computed with numpy on the host
and shipped to the device as arrays of static shape. Inside jit the tower then needs no data-dependent shapes.

The layout (S slots of L patches; W = patches per attention window = window_merged**2 * merge_unit, 64 for
Qwen2.5-VL):
* every image frame is cut into its attention windows (transformers' `get_vision_window_index`); each window is
  padded to exactly W patches, so a frame is a run of whole windows;
* frames are packed into slots of L patches (first fit, largest first); a slot holds one or several frames and
  padding, never part of a frame;
* window blocks attend within each W-patch window: [S * L / W, W, W] scores;
* full-attention blocks attend within each frame: [S, L, L] scores masked by the frame ids of the slot
  (`segment_ids`, 0 = padding), so images never attend to each other and no score is computed across slots;
* merge units (2x2 patches) stay contiguous, so the merger reads each slot's merged tokens in place, and
  `merge_inverse` gathers them back into processor order (image after image) for the decoder.
L and S come from a bucket ladder with at most 25% padding (`bucket`); S is a multiple of the data-parallel size
so the slots split over the devices like batch rows.

Vocabulary (N = patches of the images, processor order = as `pixel_values` holds them: image by image, 2x2 merge
units contiguous; window order = merge units regrouped so that each attention window is contiguous).
"""

from __future__ import annotations

import dataclasses

import numpy as np

VISION_INPUT_KEYS = ("rotary_pos", "patch_grid", "segment_ids", "merge_inverse")


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
    windows = [_frame_windows(t, h, w, spatial_merge_size, window_merged) for t, h, w in _as_grid(image_grid_thw)]
    index, sizes, offset = [], [], 0
    for (t, h, w), frames in zip(_as_grid(image_grid_thw), windows):
        for frame in frames:  # [windows, window_merged**2], -1 = outside the image
            index.append(frame[frame >= 0] + offset)
            sizes.append((frame >= 0).sum(-1))
        offset += t * (h // spatial_merge_size) * (w // spatial_merge_size)
    return np.concatenate(index), np.concatenate(sizes)


def _frame_windows(t: int, h: int, w: int, m: int, ws: int) -> list[np.ndarray]:
    """Per frame of one image, its windows in window order: int64 [num_windows, ws * ws] merged-token indexes
    (processor order within the image, row-major inside a window), -1 where a window overhangs the image."""
    if h % m or w % m:
        raise ValueError(f"image grid {h}x{w} is not divisible by spatial_merge_size={m}")
    gh, gw = h // m, w // m
    nh, nw = -(-gh // ws), -(-gw // ws)
    index = np.full((t, nh * ws, nw * ws), -1, np.int64)
    index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    windows = index.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
    return list(windows)


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
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def num_patches(image_grid_thw) -> int:
    return int(_as_grid(image_grid_thw).prod(-1).sum())


def bucket(n: int) -> int:
    """The padded size for n >= 1: n itself up to 4, then the smallest k * 2**e >= n with k in 4..7, so padding
    stays under 25% (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...)."""
    if n <= 4:
        return max(int(n), 1)
    e = max(int(n).bit_length() - 3, 0)
    return -(-int(n) // (1 << e)) * (1 << e)


@dataclasses.dataclass(frozen=True)
class Frames:
    """The frames of a list of images, each cut into whole windows (merged-token granularity).

    merged: per frame, int64 [frame_merged] processor-order merged-token indexes (over all images), -1 = padding
      inside a window; its length is a multiple of window_merged**2.
    """

    merged: tuple[np.ndarray, ...]
    num_merged: int  # merged tokens of all images (processor order: 0 .. num_merged - 1)

    @property
    def lengths(self) -> list[int]:
        return [len(f) for f in self.merged]


def image_frames(image_grid_thw, vision_config) -> Frames:
    vc = vision_config
    grid = _as_grid(image_grid_thw)
    m = vc.spatial_merge_size
    merged, offset = [], 0
    for t, h, w in grid:
        for frame in _frame_windows(int(t), int(h), int(w), m, vc.window_merged):
            flat = frame.reshape(-1)
            merged.append(np.where(flat >= 0, flat + offset, -1))
        offset += int(t) * (int(h) // m) * (int(w) // m)
    return Frames(tuple(merged), offset)


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: frame indexes per slot."""
    slots: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for s, room in enumerate(free):
            if lengths[i] <= room:
                slots[s].append(i)
                free[s] -= lengths[i]
                break
        else:
            slots.append([i])
            free.append(capacity - lengths[i])
    return slots


def slot_shape(
    image_grid_thw, vision_config, *, slot_multiple: int = 1, slot_len: int | None = None
) -> tuple[int, int]:
    """(S, L): bucketed slot count (a multiple of `slot_multiple`) and slot length in patches for these images.

    slot_len: a given L (e.g. the largest over several micro-batches), else the bucket of the longest frame."""
    vc = vision_config
    frames = image_frames(image_grid_thw, vc)
    w = vc.window_patches
    unit = vc.merge_unit
    longest = max(frames.lengths, default=0) * unit
    if slot_len is None:
        slot_len = bucket(max(-(-longest // w), 1)) * w
    elif slot_len < longest or slot_len % w:
        raise ValueError(
            f"slot length {slot_len} must be a multiple of {w} patches and fit the longest frame ({longest})"
        )
    count = len(_pack(frames.lengths, slot_len // unit))
    slots = bucket(max(count, 1))
    return -(-slots // slot_multiple) * slot_multiple, slot_len


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Where every patch of a list of images sits in S slots of L patches (numpy, host side).

    patch_index [S, L]: processor-order patch at each slot position, -1 = padding;
    rotary_pos [S, L, 2]: its (h, w) for the 2-D RoPE (0 on padding);
    patch_grid [S, L, 2]: the (h, w) patch grid of its image (0 on padding): Qwen3-VL interpolates its learned
      position embeddings from rotary_pos / patch_grid; None for a tower without such a table (Qwen2.5-VL), so no
      unused array is shipped;
    segment_ids [S, L]: 1, 2, ... for the frames of a slot, 0 on padding (full-attention blocks attend within a
      frame; window blocks within each W-patch window, which never mixes frames);
    merge_inverse [S, L / merge_unit]: flattened, processor-order merged token j sits at flat slot position
      merge_inverse[j] of the merged [S * L / merge_unit] features (entries past the images' merged tokens point at
      padding positions, so it is a permutation).
    """

    patch_index: np.ndarray
    rotary_pos: np.ndarray
    patch_grid: np.ndarray | None
    segment_ids: np.ndarray
    merge_inverse: np.ndarray
    num_merged: int  # merged tokens of the images (the meaningful prefix of merge_inverse)

    def inputs(self) -> dict[str, np.ndarray]:
        """The arrays the vision tower takes (`VISION_INPUT_KEYS`; patch_grid only for a tower that reads it), int32."""
        keys = [k for k in VISION_INPUT_KEYS if getattr(self, k) is not None]
        return {k: np.ascontiguousarray(getattr(self, k), dtype=np.int32) for k in keys}

    def pixels(self, pixel_values) -> np.ndarray:
        """Processor-order pixel_values [N, patch_dim] -> float32 [S, L, patch_dim] (zeros at padding)."""
        pixel_values = np.asarray(pixel_values, np.float32)
        n = int((self.patch_index >= 0).sum())
        if pixel_values.ndim != 2 or pixel_values.shape[0] < n:
            raise ValueError(f"pixel_values must be [patches >= {n}, patch_dim], got {pixel_values.shape}")
        padded = np.concatenate([pixel_values, np.zeros((1, pixel_values.shape[1]), np.float32)])
        return padded[np.where(self.patch_index >= 0, self.patch_index, len(pixel_values))]


def vision_layout(
    image_grid_thw, vision_config, *, slot_multiple: int = 1, num_slots: int | None = None, slot_len: int | None = None
) -> VisionLayout:
    """The slot layout of images with grids `image_grid_thw` [n, 3] (processor order; n may be 0: all padding).

    num_slots / slot_len: a given shape (e.g. shared by the micro-batches of a step), else `slot_shape`'s."""
    vc = vision_config
    unit = vc.merge_unit
    if slot_len is None or num_slots is None:
        slots, length = slot_shape(image_grid_thw, vc, slot_multiple=slot_multiple, slot_len=slot_len)
        num_slots, slot_len = num_slots or slots, slot_len or length
    frames = image_frames(image_grid_thw, vc)
    lm = slot_len // unit
    packing = _pack(frames.lengths, lm)
    if len(packing) > num_slots or max(frames.lengths, default=0) > lm:
        raise ValueError(
            f"{len(frames.lengths)} image frames need {len(packing)} slots of {slot_len} patches, "
            f"more than the {num_slots} given"
        )
    merged = np.full((num_slots, lm), -1, np.int64)
    segment = np.zeros((num_slots, lm), np.int64)
    for s, members in enumerate(packing):
        at = 0
        for k, f in enumerate(sorted(members)):
            frame = frames.merged[f]
            merged[s, at : at + len(frame)] = frame
            segment[s, at : at + len(frame)] = np.where(frame >= 0, k + 1, 0)
            at += len(frame)
    patch = np.where(merged[..., None] >= 0, merged[..., None] * unit + np.arange(unit), -1).reshape(num_slots, -1)
    rotary = vision_rotary_positions(image_grid_thw, spatial_merge_size=vc.spatial_merge_size)
    rotary = np.concatenate([rotary, np.zeros((1, 2), np.int64)])[np.where(patch >= 0, patch, len(rotary))]
    grid = _as_grid(image_grid_thw)
    sizes = np.repeat(grid[:, 1:], grid.prod(-1), axis=0)  # [N, 2]: each patch's image grid (h, w)
    sizes = np.concatenate([sizes, np.zeros((1, 2), np.int64)])[np.where(patch >= 0, patch, len(sizes))]
    flat = merged.reshape(-1)
    used = flat >= 0
    inverse = np.empty(flat.size, np.int64)
    inverse[flat[used]] = np.flatnonzero(used)
    inverse[frames.num_merged :] = np.flatnonzero(~used)
    return VisionLayout(
        patch_index=patch,
        rotary_pos=rotary,
        patch_grid=sizes if hasattr(vc, "num_position_embeddings") else None,
        segment_ids=np.repeat(segment, unit, axis=1),
        merge_inverse=inverse.reshape(num_slots, lm),
        num_merged=frames.num_merged,
    )


def layout_images(
    pixel_values,
    image_grid_thw,
    vision_config,
    *,
    slot_multiple: int = 1,
    num_slots: int | None = None,
    slot_len: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Processor outputs (pixel_values [N, patch_dim], image_grid_thw [n, 3]) -> the tower's inputs:
    pixel_values float32 [S, L, patch_dim] and the index arrays (`VisionLayout.inputs`)."""
    layout = vision_layout(
        image_grid_thw, vision_config, slot_multiple=slot_multiple, num_slots=num_slots, slot_len=slot_len
    )
    n = num_patches(image_grid_thw)
    pixel_values = np.asarray(pixel_values)
    if pixel_values.shape[0] != n:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw gives {n}")
    return layout.pixels(pixel_values), layout.inputs()
