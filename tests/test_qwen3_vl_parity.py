"""Qwen3-VL and Qwen3 against transformers 5's PyTorch models, in float32: logits within 1e-4 (text only, one image,
two images of different sizes in a row, a left-padded batch of rows with 0 / 1 / 2 images) on two tiny random
configurations (different DeepStack blocks, GQA ratios, M-RoPE sections, tied and untied heads), the vision tower's
merged and DeepStack features, greedy decoding token for token against `generate`, and sampled log-probs against a
teacher-forced forward. Checkpoints go through transformers' save_pretrained and our load_pretrained."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    hf_logits,
    image_batch,
    max_diff_on_valid,
    randomize_,
)
from jaxvlm import models, sampling
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.processing.vision import layout_images
from test_sampling import _repeat_images

ATOL = 1e-4
PATCH_DIM = 3 * 2 * 16 * 16  # Qwen3-VL's 16-px patches, 2 frames

# Two shapes of the architecture: DeepStack after different blocks and into 2 or 1 decoder layers, GQA 2:1 and 6:1,
# M-RoPE sections interleaved over 8 and 4 frequencies, untied and tied heads, 8x8 and 4x4 position tables.
CONFIGS = {
    "deepstack02_gqa2_untied": dict(
        text=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        mrope_section=[2, 3, 3],
        vision=dict(depth=3, hidden_size=32, num_heads=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 2]),
        tie=False,
    ),
    "deepstack1_gqa6_tied": dict(
        text=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1, head_dim=8),
        mrope_section=[2, 1, 1],
        vision=dict(depth=2, hidden_size=32, num_heads=4, num_position_embeddings=16, deepstack_visual_indexes=[1]),
        tie=True,
    ),
}
# A tower without DeepStack (transformers allows an empty list): no DeepStack mergers, nothing added to the decoder.
NO_DEEPSTACK = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    mrope_section=[2, 1, 1],
    vision=dict(depth=2, hidden_size=32, num_heads=2, num_position_embeddings=36, deepstack_visual_indexes=[]),
    tie=False,
)
# (images per row, grids): grids of different shapes so the position table is interpolated to each.
CASES = {
    "text_only": ([0, 0], []),
    "one_image": ([1], [[1, 6, 8]]),
    "two_images_different_sizes": ([2], [[1, 4, 10], [1, 8, 4]]),
    "left_padded_0_1_2_images": ([0, 1, 2], [[1, 6, 6], [1, 10, 4], [1, 2, 4]]),
}


def hf_qwen3_vl(name: str, spec: dict | None = None):
    """A random tiny `Qwen3VLForConditionalGeneration` of CONFIGS[name] (or `spec`), weights at a scale where logits
    are O(1)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    spec = spec or CONFIGS[name]
    t, v = spec["text"], spec["vision"]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=300,
            intermediate_size=2 * t["hidden_size"],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=spec["mrope_section"]),
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            tie_word_embeddings=spec["tie"],
            **t,
        ),
        vision_config=dict(
            intermediate_size=v["hidden_size"] + 16,
            out_hidden_size=t["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            **v,
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=spec["tie"],
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    randomize_(model, seed=len(name))
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{name: (torch model, our module, our params)}: saved by transformers, loaded by jaxvlm."""
    out = {}
    for name in CONFIGS:
        torch_model = hf_qwen3_vl(name)
        path = str(tmp_path_factory.mktemp(name))
        torch_model.save_pretrained(path)
        out[name] = (torch_model, *models.load_pretrained(path))
    return out


def batch_of(case: str, seed: int = 0) -> dict:
    rows, grids = CASES[case]
    batch = image_batch(rows, grids, seed=seed, patch_dim=PATCH_DIM)
    if not grids:  # text only, no padding: transformers then numbers positions 0..T-1 like we do
        batch["attention_mask"][:] = 1
    return batch


def test_loaded_model_is_qwen3_vl(loaded):
    _, model, params = loaded["deepstack02_gqa2_untied"]
    assert isinstance(model, models.Qwen3VL) and model.config.model_type == "qwen3_vl"
    assert model.config.text.mrope_interleaved and model.config.text.qk_norm
    assert params["visual"]["deepstack_merger_list"]["linear_fc1"]["kernel"].shape[0] == 2


# The fast tier (-m "not slow") keeps the left-padded batch with 0 / 1 / 2 images of one config.
@pytest.mark.parametrize(
    "case", [c if c == "left_padded_0_1_2_images" else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
@pytest.mark.parametrize(
    "config_name", ["deepstack02_gqa2_untied", pytest.param("deepstack1_gqa6_tied", marks=pytest.mark.slow)]
)
def test_logits_match_transformers(loaded, config_name, case):
    torch_model, model, params = loaded[config_name]
    batch = batch_of(case, seed=len(case))
    ref = hf_logits(torch_model, batch)
    ours = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    assert ours.shape == ref.shape
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors


def test_jit_path_with_host_layout_matches_transformers(loaded):
    """Under jit (what the steps and the sampler run) the host lays out the images and computes the positions."""
    torch_model, model, params = loaded["deepstack1_gqa6_tied"]
    batch = batch_of("left_padded_0_1_2_images", seed=3)
    grid = batch.pop("image_grid_thw")
    position_ids, _ = get_rope_index(
        batch["input_ids"], batch["attention_mask"], grid, image_token_id=IMAGE_TOKEN, spatial_merge_size=2
    )
    # A padded slot layout (more slots than needed): padding patches must not change anything.
    pixels, vision_inputs = layout_images(batch["pixel_values"], grid, model.config.vision, num_slots=4, slot_len=64)
    jit_batch = dict(batch, position_ids=position_ids, pixel_values=pixels, vision_inputs=vision_inputs)
    ours = jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, jit_batch)
    ref = hf_logits(torch_model, dict(batch, image_grid_thw=grid))
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL


def test_sharded_forward_and_gradient_equal_one_device(loaded):
    """Every Qwen3-VL parameter placed by the sharding rules on a (2, 2, 2) mesh (data x fsdp x tensor), rows and image
    slots split over data x fsdp: the logits and the parameter gradient of a jitted loss equal one device's."""
    from jaxvlm import sharding

    _, model, params = loaded["deepstack02_gqa2_untied"]
    batch = image_batch([1, 0, 2, 1], [[1, 6, 6], [1, 10, 4], [1, 2, 4], [1, 4, 4]], seed=6, patch_dim=PATCH_DIM)
    grid = batch.pop("image_grid_thw")
    position_ids, _ = get_rope_index(
        batch["input_ids"], batch["attention_mask"], grid, image_token_id=IMAGE_TOKEN, spatial_merge_size=2
    )
    pixels, vision_inputs = layout_images(batch["pixel_values"], grid, model.config.vision, slot_multiple=4)
    inputs = dict(batch, position_ids=position_ids, pixel_values=pixels, vision_inputs=vision_inputs)

    def loss(p, b):
        logits = model.apply({"params": p}, **b)
        return jnp.sum(jnp.where(b["attention_mask"][..., None] > 0, jnp.tanh(logits), 0.0)), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, ref_logits), ref_grads = run(params, inputs)
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    sharded_params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    rows = jax.sharding.NamedSharding(mesh, jax.P(sharding.BATCH_AXES))
    position_sharding = jax.sharding.NamedSharding(mesh, jax.P(None, sharding.BATCH_AXES))
    sharded = jax.tree.map(lambda x: jax.device_put(x, rows), {k: v for k, v in inputs.items() if k != "position_ids"})
    sharded["position_ids"] = jax.device_put(inputs["position_ids"], position_sharding)
    (_, logits), grads = run(sharded_params, sharded)
    for tree in (sharded_params, grads):  # the DeepStack mergers and the vision MLP are really split
        assert not tree["visual"]["deepstack_merger_list"]["linear_fc1"]["kernel"].sharding.is_fully_replicated
        assert not tree["visual"]["blocks"]["mlp"]["linear_fc1"]["kernel"].sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale)


def test_rows_sharing_an_image_encoding_equal_rows_with_copies(loaded):
    """A prompt's G rollout rows point at one encoding of its images (`image_offset`, what the GRPO / DyME steps
    feed): the main and the DeepStack features both follow the offset, so the logits equal those of rows that each
    carry a copy of the image."""
    _, model, params = loaded["deepstack02_gqa2_untied"]
    one = image_batch([1], [[1, 6, 4]], seed=8, patch_dim=PATCH_DIM)
    ids = np.concatenate([one["input_ids"]] * 3)
    mask = np.ones_like(ids)
    grid = np.asarray([[1, 6, 4]])
    position_ids, _ = get_rope_index(ids, mask, np.repeat(grid, 3, 0), image_token_id=IMAGE_TOKEN, spatial_merge_size=2)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    shared_pixels, shared_inputs = layout_images(one["pixel_values"], grid, model.config.vision)
    shared = forward(
        params,
        dict(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=shared_pixels,
            position_ids=position_ids,
            vision_inputs=shared_inputs,
            image_offset=np.zeros(3, np.int32),
        ),
    )
    copy_pixels, copy_inputs = layout_images(
        np.concatenate([one["pixel_values"]] * 3), np.repeat(grid, 3, 0), model.config.vision
    )
    copies = forward(
        params,
        dict(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=copy_pixels,
            position_ids=position_ids,
            vision_inputs=copy_inputs,
        ),
    )
    np.testing.assert_allclose(np.asarray(shared), np.asarray(copies), atol=1e-5)
    # The offset matters: pointing the rows past the image at padding features changes the logits.
    wrong = forward(
        params,
        dict(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=shared_pixels,
            position_ids=position_ids,
            vision_inputs=shared_inputs,
            image_offset=np.full(3, 6, np.int32),
        ),
    )
    assert np.abs(np.asarray(wrong) - np.asarray(copies)).max() > 1e-2


def test_vision_tower_and_deepstack_features_equal_transformers(loaded):
    import torch

    torch_model, model, params = loaded["deepstack02_gqa2_untied"]
    batch = batch_of("two_images_different_sizes", seed=5)
    with torch.no_grad():
        out = torch_model.model.get_image_features(
            torch.as_tensor(batch["pixel_values"]), torch.as_tensor(batch["image_grid_thw"]), return_dict=True
        )
    ref_main = torch.cat(out.pooler_output).numpy()
    ref_deep = np.stack([torch.cat(f).numpy() for f in out.deepstack_features])
    main, deep = model.apply(
        {"params": params}, batch["pixel_values"], batch["image_grid_thw"], method="vision_outputs"
    )
    n = ref_main.shape[0]
    assert deep.shape[0] == 2
    np.testing.assert_allclose(np.asarray(main)[:n], ref_main, atol=ATOL)
    np.testing.assert_allclose(np.asarray(deep)[:, :n], ref_deep, atol=ATOL)
    # DeepStack features are not the merged features again: the decoder gets something it would otherwise miss.
    assert np.abs(ref_deep[-1] - ref_main).max() > 0.1


def test_tower_without_deepstack_matches_transformers(tmp_path):
    torch_model = hf_qwen3_vl("no_deepstack", NO_DEEPSTACK)
    torch_model.save_pretrained(tmp_path)
    model, params = models.load_pretrained(str(tmp_path))
    assert "deepstack_merger_list" not in params["visual"]
    batch = batch_of("two_images_different_sizes", seed=4)
    ref = hf_logits(torch_model, batch)
    ours = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL and np.abs(ref).max() > 1.0


def test_deepstack_blocks_must_be_strictly_increasing():
    """transformers pairs the k-th DeepStack merger with the k-th listed block but collects features in depth order,
    so an unordered list would silently compute something else: refused."""
    import dataclasses

    cfg = models.preset("qwen3_vl_tiny")
    for indexes in ((1, 0), (1, 1)):
        with pytest.raises(ValueError, match="deepstack_visual_indexes .* must be strictly increasing"):
            cfg.replace(vision=dataclasses.replace(cfg.vision, deepstack_visual_indexes=indexes))


def hf_generate(torch_model, batch, max_new_tokens):
    import torch

    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == IMAGE_TOKEN).int()
    with torch.no_grad():
        out = torch_model.generate(
            **kwargs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[:, batch["input_ids"].shape[1] :].numpy()


@pytest.mark.parametrize(
    "config_name", ["deepstack02_gqa2_untied", pytest.param("deepstack1_gqa6_tied", marks=pytest.mark.slow)]
)
def test_greedy_matches_transformers_generate(loaded, config_name):
    torch_model, model, params = loaded[config_name]
    batch = image_batch([0, 1, 2], [[1, 6, 6], [1, 10, 4], [1, 2, 4]], seed=7, patch_dim=PATCH_DIM)
    n = 12
    ours = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=n, temperature=0.0, suppress_token_ids=()),
    )
    ref = hf_generate(torch_model, batch, n)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    # Not a trivial comparison: the rows differ, and some row holds at least 4 different tokens.
    assert len({tuple(row) for row in ref}) == len(ref) and max(len(np.unique(row)) for row in ref) >= 4


def test_sampled_logprobs_equal_teacher_forced_forward(loaded):
    _, model, params = loaded["deepstack02_gqa2_untied"]
    images_per_row, grids = [0, 1, 2], [[1, 6, 6], [1, 10, 4], [1, 2, 4]]
    batch = image_batch(images_per_row, grids, seed=9, patch_dim=PATCH_DIM)
    g, n, temperature = 2, 10, 0.8
    rollout = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(1),
        sampling.SamplingParams(num_generations=g, max_new_tokens=n, temperature=temperature, top_k=40),
    )
    inputs = sampling.prepare_prompts(model.config, batch)
    seq = sampling.rollout_sequences(inputs, rollout, g)
    pixels, rep = _repeat_images(batch, images_per_row, g)  # each prompt's images once per rollout
    pixels, vision_inputs = layout_images(pixels, rep, model.config.vision)
    logits = model.apply(
        {"params": params},
        seq["input_ids"],
        seq["attention_mask"],
        pixels,
        position_ids=seq["position_ids"],
        vision_inputs=vision_inputs,
    )
    t = batch["input_ids"].shape[1]
    forced = sampling.token_logprobs(logits[:, t - 1 : t + n - 1], rollout.tokens, temperature)
    mask = np.asarray(rollout.mask).astype(bool)
    assert mask.sum() > n
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[mask], np.asarray(forced)[mask], atol=ATOL)


def test_text_only_qwen3_matches_transformers(tmp_path):
    """model_type "qwen3" (Qwen3ForCausalLM): the same decoder without vision and with 1-D RoPE."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    torch_model = Qwen3ForCausalLM(config).eval()
    randomize_(torch_model, seed=3)
    torch_model.save_pretrained(tmp_path)
    model, params = models.load_pretrained(str(tmp_path))
    assert model.config.model_type == "qwen3" and model.config.vision is None and model.config.text.qk_norm
    batch = image_batch([0, 0, 0], [], seed=11)
    batch["attention_mask"][:] = 1
    ref = hf_logits(torch_model, batch)
    ours = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    assert max_diff_on_valid(ours, ref, batch["attention_mask"]) < ATOL and np.abs(ref).max() > 1.0
    greedy = sampling.generate(
        model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=8, temperature=0.0)
    )
    with torch.no_grad():
        expected = torch_model.generate(
            torch.as_tensor(batch["input_ids"]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, batch["input_ids"].shape[1] :]
    np.testing.assert_array_equal(np.asarray(greedy.tokens), expected.numpy())
