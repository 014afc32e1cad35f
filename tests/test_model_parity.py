"""Logit parity with transformers' PyTorch Qwen2.5-VL, in float32, within 1e-4 absolute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import VL_CONFIGS, hf_logits, image_batch, max_diff_on_valid
from jaxvlm import models
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.processing.vision import layout_images, vision_layout

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


@pytest.mark.slow
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
    """Under jit the host lays out the images and computes position_ids; results equal transformers."""
    torch_model, model, params = loaded["gqa2_tied_win56"]
    batch = image_batch(*CASES["left_padded_0_1_2_images"])
    grid = batch.pop("image_grid_thw")
    position_ids, _ = get_rope_index(
        batch["input_ids"],
        batch["attention_mask"],
        grid,
        image_token_id=model.config.image_token_id,
        spatial_merge_size=2,
    )
    pixels, vision_inputs = layout_images(batch["pixel_values"], grid, model.config.vision)
    jit_batch = dict(batch, position_ids=position_ids, pixel_values=pixels, vision_inputs=vision_inputs)
    ours = jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, jit_batch)
    ref = hf_logits(torch_model, dict(batch, image_grid_thw=grid))
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL


@pytest.mark.slow
@pytest.mark.parametrize("config_name", list(VL_CONFIGS))
def test_slot_layouts_give_the_same_logits(loaded, config_name):
    """Block-local vision: the image frames packed into slots (full attention within each frame of a slot, windows
    within each W patches) as the bucket gives, all in one slot, or with extra padding slots and padding full of
    garbage pixels, all give transformers' logits (which attend within windows and frames by cu_seqlens)."""
    torch_model, model, params = loaded[config_name]
    vc = model.config.vision
    batch = image_batch(*CASES["left_padded_0_1_2_images"])
    ref = hf_logits(torch_model, batch)
    grid = batch.pop("image_grid_thw")
    pos, _ = get_rope_index(
        batch["input_ids"],
        batch["attention_mask"],
        grid,
        image_token_id=model.config.image_token_id,
        spatial_merge_size=2,
    )
    w = vc.window_patches
    longest = vision_layout(grid, vc).patch_index.shape[1]
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    layouts = {
        "natural": vision_layout(grid, vc),
        "packed": vision_layout(grid, vc, num_slots=1, slot_len=8 * longest),  # all frames in one slot
        "padded": vision_layout(grid, vc, num_slots=5, slot_len=longest + 2 * w),
    }
    assert layouts["packed"].segment_ids.max() == len(grid)
    for name, layout in layouts.items():
        pixels = layout.pixels(batch["pixel_values"])
        pixels[layout.patch_index < 0] = 3.0  # padding patches must not reach any real token
        ours = forward(params, dict(batch, position_ids=pos, pixel_values=pixels, vision_inputs=layout.inputs()))
        assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL, name


def test_image_features_equal_transformers_vision_tower(loaded):
    import torch

    torch_model, model, params = loaded["gqa2_tied_win56"]
    grid = np.array([[1, 10, 6], [1, 4, 16]])
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(-1).sum()), 1176)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    ours = model.apply({"params": params}, jnp.asarray(pixels), grid, method=models.Qwen25VL.image_features)
    assert ours.shape[0] >= ref.shape[0]  # processor order, then the slot layout's padding
    np.testing.assert_allclose(ours[: ref.shape[0]], ref, atol=ATOL)


def _torch_logits(torch_model, batch: dict) -> np.ndarray:
    """transformers' forward on exactly these numpy inputs (int32 ids as the int64 torch expects)."""
    import torch

    inputs = {k: torch.as_tensor(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in batch.items()}
    with torch.no_grad():
        return torch_model(**inputs).logits.numpy()


@pytest.mark.slow
def test_processor_batch_end_to_end(tmp_path):
    """Chat template -> Processor (tokenizer built locally, real PIL images) -> both models: same logits.

    The batch is fed to our model exactly as the processor returns it (including rope_deltas), and to transformers'
    in its own processor's layout (input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids), taken
    from our processor's output; transformers' processor gives the same fields, hence the same logits.
    """
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from conftest import hf_processor, make_hf_vl_checkpoint
    from jaxvlm.processing import ImageProcessor, Processor
    from jaxvlm.tokenizer import build_tokenizer, special_token_ids

    corpus = ["How many red circles are there?", "Describe the picture.", "The answer is 3."] * 20
    tokenizer = build_tokenizer(corpus, str(tmp_path), vocab_size=400)
    ids = special_token_ids(tokenizer)
    token_ids = {
        k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    torch_model = make_hf_vl_checkpoint(str(tmp_path), "gqa6_untied_win112", vocab_size=400, token_ids=token_ids)
    ImageProcessor(max_pixels=28 * 28 * 30).save_pretrained(str(tmp_path))
    model, params = models.load_pretrained(str(tmp_path))
    processor = Processor.from_pretrained(str(tmp_path))

    rng = np.random.default_rng(0)
    image = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    conversations = [
        [{"role": "user", "content": "Describe the picture."}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe."}]}],
    ]
    texts = [processor.apply_chat_template(c) for c in conversations]
    images = [[], [image(90, 61)], [image(33, 47), image(120, 80)]]
    batch = processor(texts, images=images)
    mask = batch["attention_mask"]
    ours = model.apply({"params": params}, **batch)
    hf_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    ref = _torch_logits(torch_model, {k: batch[k] for k in hf_keys})
    assert max_diff_on_valid(ours, ref, mask) < ATOL
    ours_hf_layout = model.apply({"params": params}, **{k: batch[k] for k in hf_keys})  # positions from the host
    assert max_diff_on_valid(ours_hf_layout, ref, mask) < ATOL

    reference = hf_processor(processor.tokenizer, Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path)))
    expected = reference(
        text=texts, images=[i for row in images for i in row], padding=True, padding_side="left", return_tensors="np"
    )
    assert set(expected) == set(hf_keys)
    for key in hf_keys:
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    assert max_diff_on_valid(_torch_logits(torch_model, dict(expected)), ref, mask) < ATOL
    # Without mm_token_type_ids transformers silently numbers the positions 1-D: another model's logits.
    one_d = _torch_logits(torch_model, {k: batch[k] for k in hf_keys if k != "mm_token_type_ids"})
    assert max_diff_on_valid(one_d, ref, mask) > 100 * ATOL
