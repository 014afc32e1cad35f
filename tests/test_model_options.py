"""Model options (dtypes, remat, jit) and the errors a user meets first."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import image_batch
from jaxvlm import models
from jaxvlm.models.config import PRESETS
from jaxvlm.models.qwen2_5_vl import compute_dtype_params, splice_image_features
from jaxvlm.processing import get_rope_index, layout_images

CFG = models.preset("tiny").replace(
    image_token_id=290,
    video_token_id=291,
    vision_start_token_id=292,
    vision_end_token_id=293,
)
CFG = CFG.replace(text=dataclasses.replace(CFG.text, vocab_size=300))
BATCH = image_batch([1, 2], [[1, 6, 4], [1, 4, 4], [1, 2, 8]], seed=5)


def jit_batch(batch, cfg=CFG):
    batch = dict(batch)
    grid = batch.pop("image_grid_thw")
    batch["position_ids"], _ = get_rope_index(
        batch["input_ids"], batch["attention_mask"], grid, image_token_id=cfg.image_token_id, spatial_merge_size=2
    )
    batch["pixel_values"], batch["vision_inputs"] = layout_images(batch["pixel_values"], grid, cfg.vision)
    return batch


def mean_log_prob(model, params, batch):
    logits = model.apply({"params": params}, **batch).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    tgt = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    mask = batch["attention_mask"][:, 1:]
    return (tgt * mask).sum() / mask.sum()


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "attention", "dots"])
def test_remat_changes_neither_values_nor_gradients(remat):
    params = models.init_params(CFG, 0)
    batch = jit_batch(BATCH)
    base = jax.jit(jax.value_and_grad(lambda p: mean_log_prob(models.Qwen25VL(CFG), p, batch)))(params)
    rem = jax.jit(jax.value_and_grad(lambda p: mean_log_prob(models.Qwen25VL(CFG.replace(remat=remat)), p, batch)))(
        params
    )
    np.testing.assert_allclose(rem[0], base[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), rem[1], base[1])
    # the vision tower gets gradients too (it is not cut off by the splice)
    assert float(jnp.abs(base[1]["visual"]["patch_embed"]["kernel"]).sum()) > 0


@pytest.mark.slow
def test_bfloat16_compute_with_float32_master_weights():
    params = models.init_params(CFG.replace(param_dtype="float32"), 0)
    batch = jit_batch(BATCH)
    f32 = models.Qwen25VL(CFG)
    bf16 = models.Qwen25VL(CFG.replace(dtype="bfloat16", param_dtype="float32"))
    ref = jax.jit(lambda p: f32.apply({"params": p}, **batch))(params)
    out = jax.jit(lambda p: bf16.apply({"params": p}, **batch))(params)
    assert out.dtype == jnp.bfloat16
    mask = batch["attention_mask"].astype(bool)
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))[mask].max()
    assert err < 0.05 * np.abs(np.asarray(ref))[mask].max()
    grads = jax.jit(jax.grad(lambda p: mean_log_prob(bf16, p, batch)))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # master-weight dtype


@pytest.mark.slow
def test_casting_params_to_the_compute_dtype_first_changes_no_value():
    """The sampler casts the parameters once (`compute_dtype_params`) instead of in every layer at every decode step:
    that is only sound while every use of a parameter casts it to the compute dtype, as this checks bit for bit."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
    params = models.init_params(cfg, 0)
    # Norm scales start at 1 and biases at 0, exact in bf16: perturb every leaf so that none is.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    batch = jit_batch(BATCH)
    model = models.Qwen25VL(cfg)
    cast = compute_dtype_params(cfg, params)
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    apply = jax.jit(lambda p: model.apply({"params": p}, **batch))
    np.testing.assert_array_equal(np.asarray(apply(cast), np.float32), np.asarray(apply(params), np.float32))


def test_abstract_params_match_init():
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), models.abstract_params(CFG))
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), models.init_params(CFG, 0))
    layers = shapes["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][0]
    assert layers == (CFG.text.num_hidden_layers, CFG.text.hidden_size, CFG.text.hidden_size)


def test_traced_inputs_without_host_metadata_fail_clearly():
    model, params = models.Qwen25VL(CFG), models.init_params(CFG, 0)
    batch = dict(BATCH)
    with pytest.raises(ValueError, match="pixel_values is traced.*layout_images"):
        jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, batch)
    with pytest.raises(ValueError, match=r"pixel_values must be in the slot layout \[S, L, patch_dim\]"):
        model.apply({"params": params}, **dict(jit_batch(BATCH), pixel_values=BATCH["pixel_values"]))
    batch = jit_batch(BATCH)
    del batch["position_ids"]
    batch["image_grid_thw"] = BATCH["image_grid_thw"]
    with pytest.raises(ValueError, match="input_ids is traced.*position_ids"):
        jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, batch)


def test_image_token_count_mismatch_is_reported():
    model, params = models.Qwen25VL(CFG), models.init_params(CFG, 0)
    batch = dict(BATCH)
    batch["image_grid_thw"] = np.array([[1, 6, 4], [1, 4, 4], [1, 4, 8]])  # the last image would need 8 tokens
    batch["pixel_values"] = np.zeros((24 + 16 + 32, 1176), np.float32)
    with pytest.raises(ValueError, match="image tokens do not match"):
        model.apply({"params": params}, **batch)


def test_text_only_model_rejects_images():
    cfg = models.ModelConfig(text=CFG.text, vision=None, model_type="qwen2")
    model, params = models.Qwen25VL(cfg), models.init_params(cfg, 0)
    assert "visual" not in params
    with pytest.raises(ValueError, match="text-only model"):
        model.apply({"params": params}, BATCH["input_ids"], pixel_values=BATCH["pixel_values"])


def test_splice_fills_image_positions_in_row_major_order():
    embeds = jnp.zeros((2, 4, 1))
    ids = jnp.array([[9, 7, 7, 9], [7, 9, 9, 7]])
    feats = jnp.arange(1.0, 6.0)[:, None]  # one spare feature (bucket padding) is never used
    out = splice_image_features(embeds, ids, feats, image_token_id=7)[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0], [3, 0, 0, 4]])
    # rows that share an image (a prompt's rollouts) point at the same features
    shared = splice_image_features(embeds, ids, feats, image_token_id=7, image_offset=jnp.array([2, 2]))[..., 0]
    np.testing.assert_array_equal(shared, [[0, 3, 4, 0], [3, 0, 0, 4]])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model_type", "qwen2_vl", "model_type='qwen2_vl' is not supported"),
        ("dtype", "int8", "dtype='int8'"),
        ("remat", "sometimes", "remat='sometimes'"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        CFG.replace(**{field: value})


def test_unknown_keyword_is_not_silently_ignored():
    model, params = models.Qwen25VL(CFG), models.init_params(CFG, 0)
    with pytest.raises(TypeError, match="attention_masks"):
        model.apply({"params": params}, BATCH["input_ids"], attention_masks=BATCH["attention_mask"])


def test_config_validation_of_shapes():
    with pytest.raises(ValueError, match="text.hidden_act='relu' is not supported"):
        CFG.replace(text=dataclasses.replace(CFG.text, hidden_act="relu"))
    with pytest.raises(ValueError, match="mrope_section=.* must sum to head_dim/2=8"):
        CFG.replace(text=dataclasses.replace(CFG.text, mrope_section=(2, 2, 2)))
    with pytest.raises(ValueError, match="not a multiple of text.num_key_value_heads=3"):
        CFG.replace(text=dataclasses.replace(CFG.text, num_key_value_heads=3))
    with pytest.raises(ValueError, match="fullatt_block_indexes \\[5\\] out of range"):
        CFG.replace(vision=dataclasses.replace(CFG.vision, fullatt_block_indexes=(5,)))


def test_3b_preset_has_qwen2_5_vl_3b_parameter_counts():
    """Shapes only (eval_shape): vision 668.7 M + LM 3,085.9 M (tied) = 3.755 B, as counted from the HF modules."""
    shapes = models.abstract_params(models.preset("qwen2_5_vl_3b"))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert round(count(shapes["visual"]) / 1e5) == 6687
    assert round(count(shapes["language_model"]) / 1e5) == 30859
    assert "lm_head" not in shapes  # tied


@pytest.mark.parametrize(
    "name, published",
    [("qwen3_vl_2b", 2_127_532_032), ("qwen3_vl_4b", 4_437_815_808)],
)
def test_qwen3_vl_presets_have_the_published_parameter_counts(name, published):
    """Shapes only (eval_shape): the total of Qwen3-VL-2B / 4B-Instruct's safetensors (tied heads), and the parts."""
    shapes = models.abstract_params(models.preset(name))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(shapes) == published
    assert "lm_head" not in shapes and "deepstack_merger_list" in shapes["visual"]
    assert shapes["visual"]["deepstack_merger_list"]["linear_fc1"]["kernel"].shape == (3, 4096, 4096)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_and_the_auto_remat_default(name):
    from jaxvlm.models.config import num_params

    cfg = models.preset(name)
    assert num_params(cfg) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.abstract_params(cfg)))
    small = ("tiny", "small", "100m", "qwen3_vl_tiny", "qwen3_vl_100m")
    expected = "none" if name in small else "full"  # the documented default per preset
    assert models.preset(name, remat="auto").remat == expected


def test_every_supported_activation_is_implemented():
    from jaxvlm.models.config import SUPPORTED_ACTIVATIONS
    from jaxvlm.models.qwen2_5_vl import _ACTIVATIONS

    assert set(_ACTIVATIONS) == set(SUPPORTED_ACTIVATIONS)
