"""Qwen3-VL (and text-only Qwen3) as a pure-functional flax.linen model, a port of transformers 5's
`Qwen3VLForConditionalGeneration`.

What differs from Qwen2.5-VL, and where it lives:
* the decoder is the Qwen3 decoder: RMSNorm over each head of q and k before RoPE, no q/k/v biases
  (`TextConfig.qk_norm`, in the shared `qwen2_5_vl.TextAttention`); M-RoPE with the t/h/w frequencies interleaved
  (`TextConfig.mrope_interleaved`, `qwen2_5_vl.mrope_axes`). A text-only Qwen3 is `Qwen25VL` with those flags;
* the vision tower (`Qwen3VisionTower`, here): 16-px patches with a biased patch embedding, learned absolute position
  embeddings (a square table bilinearly interpolated, corners aligned, to each image's patch grid) added to the patch
  embeddings, 2-D RoPE, full attention within each image in every block, LayerNorm, a gelu-tanh MLP, the 2x2 patch
  merger (LayerNorm before the merge);
* DeepStack: the outputs of the blocks in `deepstack_visual_indexes`, each through its own merger (LayerNorm after
  the merge), are added to the decoder's hidden states at the image tokens after decoder layers 0 .. k-1
  (`qwen2_5_vl.add_deepstack`).

Images use the same host-side slot layout as Qwen2.5-VL (`jaxvlm.processing.layout_images`) with windows of one
merge unit (`Qwen3VisionConfig.window_patches`), so every block attends within each frame of a slot; the layout's
`patch_grid` gives each patch's image size for the position-embedding interpolation. Parameter paths mirror the
transformers module names (`jaxvlm.models.checkpoint` maps them), the blocks stacked on a leading axis (`nn.scan`)
and the DeepStack mergers on another (`nn.vmap`).

Numerics follow transformers: LayerNorm, RMSNorm and softmax in float32, RoPE angles in float32.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.models.config import LoraConfig, Qwen3VisionConfig
from jaxvlm.models.qwen2_5_vl import (
    _ACTIVATIONS,
    Qwen25VL,
    _attend,
    _dense,
    _maybe_remat,
    apply_rotary,
    vision_cos_sin,
)
from jaxvlm.sharding import BATCH, constrain

Array = jax.Array


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, in float32 then cast back (torch's nn.LayerNorm); params as flax's
    nn.LayerNorm names them (scale, bias)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def interpolation_taps(coord: Array, size: Array, side: int) -> tuple[Array, Array]:
    """Bilinear taps (corners aligned) of target positions `coord` on an axis of `size` into a table axis of `side`:
    transformers' `_interpolation_axis_taps_weights(mode="bilinear", align_corners=True)`, in the same float32 steps.

    coord, size: int [...] -> (taps int32 [..., 2], weights float32 [..., 2])."""
    src = coord.astype(jnp.float32) * jnp.float32(side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2, dtype=jnp.float32)
    taps = jnp.clip(floor.astype(jnp.int32)[..., None] + jnp.arange(2, dtype=jnp.int32), 0, side - 1)
    weights = jnp.maximum(1 - jnp.abs(src[..., None] - floor[..., None] - offsets), 0)
    return taps, weights


def interpolated_position_embeddings(table: Array, rotary_pos: Array, patch_grid: Array, side: int) -> Array:
    """The learned [side * side, Dv] position table resampled to each patch's place in its image (bilinear, corners
    aligned: torch's `F.interpolate` of the square grid to the image's (h, w) patch grid).

    rotary_pos, patch_grid: int [..., 2], the patch's (row, col) and its image's (h, w) (`VisionLayout`).
    Returns [..., Dv] in the table's dtype."""
    h_taps, h_weights = interpolation_taps(rotary_pos[..., 0], patch_grid[..., 0], side)
    w_taps, w_weights = interpolation_taps(rotary_pos[..., 1], patch_grid[..., 1], side)
    index = (h_taps[..., :, None] * side + w_taps[..., None, :]).reshape(*h_taps.shape[:-1], 4)  # [..., 4]
    weights = (h_weights[..., :, None] * w_weights[..., None, :]).reshape(*h_weights.shape[:-1], 4)
    return jnp.sum(table[index] * weights[..., None].astype(table.dtype), axis=-2)


class VisionSelfAttention(nn.Module):
    """Full attention within each frame of a slot.

    x [S, L, Dv], cos/sin [S, L, Dh], segment_ids [S, L] -> [S, L, Dv]."""

    config: Qwen3VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array) -> Array:
        c = self.config
        s, length = x.shape[:2]
        qkv = _dense(3 * c.hidden_size, True, self.dtype, self.param_dtype, "qkv", self.lora)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(s, length, 3, c.num_heads, c.head_dim), 2, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (constrain(t, BATCH, None, "tensor", None) for t in (q, k, v))
        out = _attend(q, k, v, segment_ids, causal=False, implementation=self.implementation)
        return _dense(c.hidden_size, True, self.dtype, self.param_dtype, "proj", self.lora)(out.reshape(x.shape))


class VisionMLP(nn.Module):
    """linear_fc2(act(linear_fc1(x))), gelu-tanh for Qwen3-VL: [..., Dv] -> [..., Dv]."""

    config: Qwen3VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = _dense(c.intermediate_size, True, self.dtype, self.param_dtype, "linear_fc1", self.lora)(x)
        return _dense(c.hidden_size, True, self.dtype, self.param_dtype, "linear_fc2", self.lora)(
            _ACTIVATIONS[c.hidden_act](h)
        )


class Qwen3VisionBlock(nn.Module):
    """Pre-LayerNorm ViT block (transformers' `Qwen3VLVisionBlock`)."""

    config: Qwen3VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array):
        """x [S, L, Dv] -> (x, x): the scan's carry and this block's output (stacked by the scan into
        [depth, S, L, Dv], from which the tower reads the DeepStack blocks' features)."""
        c = self.config
        norm = functools.partial(LayerNorm, c.layer_norm_eps, self.dtype, self.param_dtype)
        attn = VisionSelfAttention(c, self.dtype, self.param_dtype, self.implementation, self.lora, name="attn")
        x = x + attn(norm(name="norm1")(x), cos, sin, segment_ids)
        x = x + VisionMLP(c, self.dtype, self.param_dtype, self.lora, name="mlp")(norm(name="norm2")(x))
        x = constrain(x, BATCH, None, None)
        return x, x


class Qwen3PatchMerger(nn.Module):
    """Each 2x2 merge unit (4 consecutive patches) -> LayerNorm -> Linear -> GELU -> Linear(out_hidden_size):
    [..., L, Dv] -> [..., L / merge_unit, D]. The main merger normalises each patch before the merge
    (LayerNorm(Dv)); the DeepStack mergers the merged unit (LayerNorm(4 Dv), transformers' use_postshuffle_norm)."""

    config: Qwen3VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    postshuffle_norm: bool = False
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        width = c.hidden_size * c.merge_unit
        norm = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, name="norm")
        if not self.postshuffle_norm:
            x = norm(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] // c.merge_unit, width)  # merge units are contiguous
        if self.postshuffle_norm:
            x = norm(x)
        x = _dense(width, True, self.dtype, self.param_dtype, "linear_fc1", self.lora)(x)
        x = jax.nn.gelu(x, approximate=False)
        return _dense(c.out_hidden_size, True, self.dtype, self.param_dtype, "linear_fc2", self.lora)(x)


class PositionTable(nn.Module):
    """The learned position table [num_position_embeddings, Dv], named as transformers' nn.Embedding (weight)."""

    num: int
    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> Array:
        return self.param("embedding", nn.initializers.normal(stddev=0.02), (self.num, self.features), self.param_dtype)


class Qwen3VisionTower(nn.Module):
    config: Qwen3VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    remat: str = "none"
    implementation: str = "xla"
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, pixel_values: Array, vision_inputs: dict[str, Array]) -> tuple[Array, Array]:
        """pixel_values [S, L, C*T*p*p] in the slot layout (`jaxvlm.processing.vision_layout`) -> (merged image
        features [Q, D], DeepStack features [k, Q, D] or None when k = 0), Q = S * L / merge_unit rows in processor
        order (the images' merged tokens first, then padding), k = len(deepstack_visual_indexes)."""
        c = self.config
        # The Conv3d patch embedding (kernel = stride = (T, p, p), with bias) is a matmul over the flattened patch.
        x = constrain(pixel_values.astype(self.dtype), BATCH, None, None)
        x = _dense(c.hidden_size, True, self.dtype, self.param_dtype, "patch_embed")(x)  # [S, L, Dv]
        table = PositionTable(c.num_position_embeddings, c.hidden_size, self.param_dtype, name="pos_embed")()
        positions = interpolated_position_embeddings(
            table, vision_inputs["rotary_pos"], vision_inputs["patch_grid"], c.num_grid_per_side
        )
        x = x + positions.astype(self.dtype)
        cos, sin = vision_cos_sin(vision_inputs["rotary_pos"], c.head_dim, c.rope_theta)
        blocks = nn.scan(
            _maybe_remat(Qwen3VisionBlock, self.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.depth,
        )(c, self.dtype, self.param_dtype, self.implementation, self.lora, name="blocks")
        x, outputs = blocks(x, cos, sin, vision_inputs["segment_ids"])  # outputs [depth, S, L, Dv]
        inverse = vision_inputs["merge_inverse"].reshape(-1)  # back to processor order
        merged = Qwen3PatchMerger(c, self.dtype, self.param_dtype, lora=self.lora, name="merger")(x)  # [S, L / unit, D]
        merged = merged.reshape(-1, merged.shape[-1])[inverse]
        if not c.deepstack_visual_indexes:
            return merged, None  # a tower without DeepStack (transformers allows an empty list)
        deepstack = outputs[np.asarray(c.deepstack_visual_indexes, np.int32)]  # [k, S, L, Dv]
        mergers = nn.vmap(
            Qwen3PatchMerger,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=0,
            out_axes=0,
        )(c, self.dtype, self.param_dtype, True, self.lora, name="deepstack_merger_list")
        deepstack = mergers(deepstack)  # [k, S, L / unit, D]
        deepstack = deepstack.reshape(deepstack.shape[0], -1, deepstack.shape[-1])[:, inverse]
        return merged, deepstack


class Qwen3VL(Qwen25VL):
    """Qwen3-VL for conditional generation: `Qwen25VL`'s interface (`__call__`, `encode`, `prefill`, `decode_step`,
    `lm_logits`, `image_features`) with the Qwen3-VL vision tower and DeepStack; the decoder's differences are
    configuration (`TextConfig.qk_norm`, `mrope_interleaved`)."""

    vision_tower_class = Qwen3VisionTower
