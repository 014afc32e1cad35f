"""Logit parity with transformers' PyTorch Qwen2.5-VL, in float32, within 1e-4 absolute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VL_CONFIGS, hf_logits, image_batch, max_diff_on_valid

from jaxvlm import models
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.processing.vision import vision_inputs

ATOL = 1e-4

# (images per row, grids): grids have odd merged sizes so windows are partially filled.
CASES = {
    "text_only": ([0, 0], []),
    "one_image": ([1], [[1, 8, 12]]),
    "two_images_different_resolutions": ([2], [[1, 10, 6], [1, 4, 16]]),
    "left_padded_0_1_2_images": ([0, 1, 2], [[1, 6, 6], [1, 12, 10], [1, 4, 4]]),
}


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {name: (torch_model, *models.load_pretrained(path)) for name, (torch_model, path) in hf_checkpoints.items()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config_name", list(VL_CONFIGS))
def test_logits_match_transformers(loaded, config_name, case):
    torch_model, model, params = loaded[config_name]
    rows, grids = CASES[case]
    batch = image_batch(rows, grids, seed=len(case))
    if not grids:  # text only, no padding: transformers then numbers positions 0..T-1 like we do
        batch["attention_mask"][:] = 1
    ref = hf_logits(torch_model, batch)
    ours = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    assert ours.shape == ref.shape
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors


def test_jit_path_with_precomputed_inputs_matches_eager(loaded):
    """Under jit the host computes vision_inputs and position_ids; results equal the eager path."""
    torch_model, model, params = loaded["gqa2_tied_win56"]
    batch = image_batch(*CASES["left_padded_0_1_2_images"])
    grid = batch.pop("image_grid_thw")
    position_ids, _ = get_rope_index(
        batch["input_ids"], batch["attention_mask"], grid, image_token_id=model.config.image_token_id,
        spatial_merge_size=2,
    )
    jit_batch = dict(batch, position_ids=position_ids, vision_inputs=vision_inputs(grid, model.config.vision))
    ours = jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, jit_batch)
    ref = hf_logits(torch_model, dict(batch, image_grid_thw=grid))
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL


def test_padded_vision_bucket_gives_same_logits(loaded):
    """Padding pixel_values to a bucket size (extra patches) must not change any real token's logits."""
    _, model, params = loaded["gqa6_untied_win112"]
    batch = image_batch(*CASES["two_images_different_resolutions"])
    grid = batch.pop("image_grid_thw")
    pos, _ = get_rope_index(batch["input_ids"], batch["attention_mask"], grid, image_token_id=290, spatial_merge_size=2)
    n = batch["pixel_values"].shape[0]
    exact = dict(batch, position_ids=pos, vision_inputs=vision_inputs(grid, model.config.vision))
    padded_pixels = np.concatenate([batch["pixel_values"], np.full((64, 1176), 3.0, np.float32)])
    padded = dict(exact, pixel_values=padded_pixels, vision_inputs=vision_inputs(grid, model.config.vision, pad_to=n + 64))
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    np.testing.assert_allclose(forward(params, padded), forward(params, exact), atol=1e-5)


def test_image_features_equal_transformers_vision_tower(loaded):
    import torch

    torch_model, model, params = loaded["gqa2_tied_win56"]
    grid = np.array([[1, 10, 6], [1, 4, 16]])
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(-1).sum()), 1176)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    ours = model.apply({"params": params}, jnp.asarray(pixels), grid, method=models.Qwen25VL.image_features)
    np.testing.assert_allclose(ours, ref, atol=ATOL)
