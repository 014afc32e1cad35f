"""Vision metadata equals transformers' window index / rotary positions / cu_seqlens."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from jaxvlm.models import VisionConfig
from jaxvlm.processing.vision import vision_inputs, vision_rotary_positions, vision_window_index

grids = st.lists(
    st.tuples(st.just(1), st.integers(1, 9).map(lambda x: 2 * x), st.integers(1, 9).map(lambda x: 2 * x)),
    min_size=1, max_size=3,
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


@pytest.mark.parametrize("grid", [[[1, 4, 6]], [[1, 10, 6], [1, 4, 16]], [[2, 4, 4], [1, 6, 2]]])
def test_segments_reproduce_transformers_attention_blocks(grid):
    """Window order + segment ids describe exactly transformers' (permuted) cu_window_seqlens / cu_seqlens blocks."""
    cfg = VisionConfig(window_size=56)
    g = torch.tensor(grid)
    vi = vision_inputs(grid, cfg)
    ref_index, ref_cu_win = get_vision_window_index(g, spatial_merge_size=2, window_size=56, patch_size=14)
    expected_order = (ref_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(vi["patch_order"], expected_order)
    boundaries = lambda seg: np.flatnonzero(np.diff(seg)) + 1  # noqa: E731
    np.testing.assert_array_equal(boundaries(vi["window_segment_ids"]), ref_cu_win.numpy()[1:-1])
    np.testing.assert_array_equal(boundaries(vi["full_segment_ids"]), get_vision_cu_seqlens(g).numpy()[1:-1])
    positions = get_vision_position_ids(g, 2).numpy()
    np.testing.assert_array_equal(vi["rotary_pos"], positions[expected_order])
    np.testing.assert_array_equal(vi["merge_inverse"], np.argsort(ref_index.numpy()))


def test_padding_to_a_bucket():
    cfg = VisionConfig(window_size=56)
    exact = vision_inputs([[1, 4, 6]], cfg)
    padded = vision_inputs([[1, 4, 6]], cfg, pad_to=40)
    n = 24
    assert {k: v.shape[0] for k, v in padded.items()} == {
        "patch_order": 40, "rotary_pos": 40, "full_segment_ids": 40, "window_segment_ids": 40, "merge_inverse": 10
    }
    for key, value in exact.items():
        np.testing.assert_array_equal(padded[key][: len(value)], value)
    # padding patches form their own segment in every block type, so real patches never attend to them
    assert set(padded["full_segment_ids"][n:]).isdisjoint(padded["full_segment_ids"][:n])
    assert set(padded["window_segment_ids"][n:]).isdisjoint(padded["window_segment_ids"][:n])
    with pytest.raises(ValueError, match="multiple of merge unit 4"):
        vision_inputs([[1, 4, 6]], cfg, pad_to=26)
    with pytest.raises(ValueError, match="must be >= 24 patches"):
        vision_inputs([[1, 4, 6]], cfg, pad_to=20)


def test_bad_grids_are_rejected():
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size=2"):
        vision_inputs([[1, 3, 4]], VisionConfig())
    with pytest.raises(ValueError, match="must be positive"):
        vision_inputs([[1, 0, 4]], VisionConfig())
