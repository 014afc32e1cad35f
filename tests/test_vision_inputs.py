"""The image-slot layout reproduces transformers' window index, rotary positions and attention blocks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from jaxvlm.models import Qwen3VisionConfig, VisionConfig
from jaxvlm.processing.vision import (
    bucket,
    layout_images,
    slot_shape,
    vision_layout,
    vision_rotary_positions,
    vision_window_index,
)

grids = st.lists(
    st.tuples(st.just(1), st.integers(1, 9).map(lambda x: 2 * x), st.integers(1, 9).map(lambda x: 2 * x)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=40, deadline=None)
@given(grid=grids, window=st.sampled_from([28, 56, 112]))
def test_window_index_and_positions_equal_transformers(grid, window):
    g = torch.tensor(grid)
    ref_index, ref_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=14)
    index, sizes = vision_window_index(grid, spatial_merge_size=2, window_merged=window // 28)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes * 4)]), ref_cu.numpy())
    np.testing.assert_array_equal(
        vision_rotary_positions(grid, spatial_merge_size=2), get_vision_position_ids(g, 2).numpy()
    )


def _blocks(layout, width: int | None) -> set[frozenset]:
    """Sets of processor-order patches that attend to each other: per W-wide run of a slot (windows), or per
    (slot, frame id) (full attention); padding excluded."""
    out = set()
    for s in range(layout.patch_index.shape[0]):
        patches, segments = layout.patch_index[s], layout.segment_ids[s]
        if width:
            groups = [patches[i : i + width][segments[i : i + width] > 0] for i in range(0, len(patches), width)]
        else:
            groups = [patches[segments == k] for k in range(1, segments.max() + 1)]
        out |= {frozenset(g.tolist()) for g in groups if len(g)}
    return out


def _reference_blocks(order: np.ndarray, cu: np.ndarray) -> set[frozenset]:
    return {frozenset(order[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:]) if b > a}


@settings(max_examples=25, deadline=None)
@given(grid=grids, window=st.sampled_from([56, 112]), extra=st.sampled_from([None, 2]))
def test_layout_reproduces_transformers_attention_blocks(grid, window, extra):
    """Each W-patch run of a slot holds exactly one of transformers' windows (cu_window_seqlens over the window
    order) and each frame id of a slot exactly one frame (cu_seqlens), whatever the packing; rotary positions
    travel with their patches and merge_inverse finds every merged token."""
    cfg = VisionConfig(window_size=window)
    g = torch.tensor(grid)
    w = cfg.window_patches
    natural = vision_layout(grid, cfg)
    layout = (
        natural
        if extra is None
        else vision_layout(grid, cfg, num_slots=1, slot_len=w * -(-natural.patch_index.size // w) * extra)
    )  # everything in one slot
    ref_index, ref_cu_win = get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=14)
    window_order = (ref_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    assert _blocks(layout, w) == _reference_blocks(window_order, ref_cu_win.numpy())
    assert _blocks(layout, None) == _reference_blocks(
        np.arange(int(g.prod(-1).sum())), get_vision_cu_seqlens(g).numpy()
    )
    positions = get_vision_position_ids(g, 2).numpy()
    valid = layout.patch_index >= 0
    np.testing.assert_array_equal(layout.rotary_pos[valid], positions[layout.patch_index[valid]])
    assert (layout.rotary_pos[~valid] == 0).all()
    first_patch = layout.patch_index.reshape(-1, 4)[:, 0]  # merge units stay contiguous
    np.testing.assert_array_equal(
        first_patch[layout.merge_inverse.reshape(-1)[: layout.num_merged]], np.arange(layout.num_merged) * 4
    )
    assert sorted(layout.merge_inverse.reshape(-1).tolist()) == list(range(layout.merge_inverse.size))


def test_pixels_and_index_arrays():
    cfg = VisionConfig(window_size=56)
    grid = [[1, 4, 6], [1, 2, 2]]
    n = 28
    pixels = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    slotted, inputs = layout_images(pixels, grid, cfg, slot_multiple=4)
    layout = vision_layout(grid, cfg, slot_multiple=4)
    assert slotted.shape == (*layout.patch_index.shape, 3) and slotted.shape[0] == 4  # 1 slot, rounded up to 4
    valid = layout.patch_index >= 0
    np.testing.assert_array_equal(slotted[valid], pixels[layout.patch_index[valid]])
    assert (slotted[~valid] == 0).all() and valid.sum() == n
    assert set(inputs) == {"rotary_pos", "segment_ids", "merge_inverse"}  # Qwen2.5-VL reads no patch_grid
    assert all(v.dtype == np.int32 for v in inputs.values())
    # Qwen3-VL's tower also takes each patch's image grid (h, w): patches 0..23 are the 4x6 image's, 24..27 the 2x2
    # one's; padding 0.
    q3 = Qwen3VisionConfig()
    _, q3_inputs = layout_images(pixels, grid, q3, slot_multiple=4)
    q3_layout = vision_layout(grid, q3, slot_multiple=4)
    assert set(q3_inputs) == {"rotary_pos", "patch_grid", "segment_ids", "merge_inverse"}
    q3_valid = q3_layout.patch_index >= 0
    image_of = np.where(q3_layout.patch_index >= 24, 1, 0)
    expected = np.where(q3_valid[..., None], np.asarray([[4, 6], [2, 2]])[image_of], 0)
    np.testing.assert_array_equal(q3_inputs["patch_grid"], expected)
    with pytest.raises(ValueError, match="pixel_values has 27 patches but image_grid_thw gives 28"):
        layout_images(pixels[:27], grid, cfg)


def test_no_images_is_all_padding():
    cfg = VisionConfig(window_size=56)
    layout = vision_layout(np.zeros((0, 3), np.int64), cfg, slot_multiple=2)
    assert layout.patch_index.shape == (2, cfg.window_patches) and (layout.patch_index == -1).all()
    assert (layout.segment_ids == 0).all() and layout.num_merged == 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 100_000))
def test_bucket_wastes_under_a_quarter(n):
    b = bucket(n)
    assert b >= n and (n <= 4 or b < 1.25 * n) and bucket(b) == b and bucket(n + 1) >= b


def test_slot_shape_buckets_and_rejects_a_short_slot():
    cfg = VisionConfig(window_size=112)  # W = 64 patches
    big = [[1, 32, 32]]  # a 448 px image: 16 windows, 1024 patches
    assert slot_shape(big, cfg) == (1, 1024)
    assert slot_shape(big * 9, cfg, slot_multiple=8) == (16, 1024)  # 9 slots -> bucket 10 -> multiple of 8
    assert slot_shape([[1, 4, 4]] * 3, cfg, slot_len=1024) == (1, 1024)  # three small frames share a slot
    with pytest.raises(ValueError, match="must be a multiple of 64 patches and fit the longest frame"):
        slot_shape(big, cfg, slot_len=960)


def test_bad_grids_are_rejected():
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size=2"):
        vision_layout([[1, 3, 4]], VisionConfig())
    with pytest.raises(ValueError, match="must be positive"):
        vision_layout([[1, 0, 4]], VisionConfig())
    with pytest.raises(ValueError, match="need 2 slots of 64 patches, more than the 1 given"):
        vision_layout([[1, 8, 8], [1, 8, 8]], VisionConfig(), num_slots=1, slot_len=64)
