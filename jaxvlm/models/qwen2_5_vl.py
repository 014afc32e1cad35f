"""Qwen2.5-VL (and text-only Qwen2 / Qwen2.5) as a pure-functional flax.linen model.

Params are a plain nested dict whose paths mirror the Hugging Face module names (see `checkpoint.py`), with the
decoder layers and vision blocks stacked on a leading layer axis (`nn.scan`), so compile time does not grow with
depth and per-layer rematerialisation is one flag.

Shapes are static inside jit. Everything data-dependent is computed on the host and passed in as arrays:
* `vision_inputs` (window permutation, segment ids, rotary coordinates) from `jaxvlm.processing.vision_inputs`;
* `position_ids` [3, B, T] (M-RoPE) from `jaxvlm.processing.get_rope_index`.
Called eagerly with concrete numpy inputs, the model computes both itself, so a transformers processor's output
(`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`) can be fed directly.

Numerics follow transformers: RMSNorm and softmax in float32, vision RoPE in float32, M-RoPE angles in float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxvlm.models import fused
from jaxvlm.models.attention import attention, resolve_implementation
from jaxvlm.models.config import LoraConfig, ModelConfig, RopeScaling, TextConfig, VisionConfig
from jaxvlm.sharding import BATCH, constrain

Array = jax.Array

_ACTIVATIONS = {  # keys must equal config.SUPPORTED_ACTIVATIONS, which validate() checks against
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
_INIT = nn.initializers.normal(stddev=0.02)  # transformers' initializer_range


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * scale, normalised in float32 then cast back (transformers' Qwen2RMSNorm)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _linear_params(module: nn.Module, in_features: int, features: int, use_bias: bool, param_dtype):
    """kernel [in, out] (normal(0.02)) and bias [out] (zeros, or None), named as flax's nn.Dense names them."""
    kernel = module.param("kernel", _INIT, (in_features, features), param_dtype)
    bias = module.param("bias", nn.initializers.zeros, (features,), param_dtype) if use_bias else None
    return kernel, bias


def _settings(module: nn.Module, lora: LoraConfig | None) -> LoraConfig:
    if lora is None:
        raise ValueError(
            f"parameters hold LoRA adapters at {'/'.join(module.scope.path)} but the model's config has no lora "
            "settings: build the model with ModelConfig(lora=LoraConfig(...)), or drop the adapters "
            "(jaxvlm.models.lora.without_adapters / merged)"
        )
    return lora


class Adapter(NamedTuple):
    """A linear layer's low-rank adapter: a [in, r], b [r, out] (see `jaxvlm.models.lora`)."""

    a: Array
    b: Array


def _adapter(module: nn.Module) -> Adapter | None:
    """The layer's adapter when its params hold one (`lora.add_adapters` puts lora_a / lora_b next to kernel)."""
    if not module.has_variable("params", "lora_a"):
        return None
    return Adapter(module.get_variable("params", "lora_a"), module.get_variable("params", "lora_b"))


def _adapter_delta(module: nn.Module, x: Array, adapter: Adapter, dtype, lora: LoraConfig | None) -> Array:
    """(dropout(x) @ a) @ b * alpha / rank in the compute dtype (PEFT's LoRA branch). Dropout runs only when the
    caller passes a "dropout" rng (training steps with lora.dropout > 0); scoring and sampling are deterministic."""
    lora = _settings(module, lora)
    if lora.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), jnp.zeros((), x.dtype)).astype(x.dtype)
    return fused.low_rank(x, fused.cast(adapter.a, dtype), fused.cast(adapter.b, dtype)) * jnp.asarray(
        lora.scale, dtype
    )


class LinearParams(nn.Module):
    """A linear layer's parameters alone, for layers that apply several at once (`GatedMLP`): (kernel, bias,
    adapter or None)."""

    features: int
    use_bias: bool
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, in_features: int):
        kernel, bias = _linear_params(self, in_features, self.features, self.use_bias, self.param_dtype)
        return kernel, bias, _adapter(self)


class Dense(nn.Module):
    """x @ kernel + bias in the compute dtype, with `fused.dense`'s backward; params as flax's nn.Dense. A LoRA
    adapter in the params (lora_a, lora_b) adds its low-rank branch."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel, bias = _linear_params(self, x.shape[-1], self.features, self.use_bias, self.param_dtype)
        x = x.astype(self.dtype)
        y = fused.dense(x, fused.cast(kernel, self.dtype), fused.cast(bias, self.dtype))
        adapter = _adapter(self)
        return y if adapter is None else y + _adapter_delta(self, x, adapter, self.dtype, self.lora)


def _dense(features: int, use_bias: bool, dtype, param_dtype, name: str, lora: LoraConfig | None = None) -> Dense:
    return Dense(features, use_bias, dtype, param_dtype, lora, name=name)


class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); the vision tower's has biases, the decoder's does not. One fused
    backward (`fused.gated_mlp`); the parameters keep the Hugging Face names gate_proj / up_proj / down_proj."""

    hidden_size: int
    intermediate_size: int
    use_bias: bool
    act: str
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, i = x.shape[-1], self.intermediate_size
        layers = [
            LinearParams(n, self.use_bias, self.param_dtype, name=name)
            for name, n in (("gate_proj", i), ("up_proj", i), ("down_proj", self.hidden_size))
        ]
        params = [layer(k) for layer, k in zip(layers, (d, d, i))]
        x = x.astype(self.dtype)
        act = _ACTIVATIONS[self.act]
        if all(adapter is None for _, _, adapter in params):
            return fused.gated_mlp(act, x, *(fused.cast(p, self.dtype) for k, b, _ in params for p in (k, b)))

        # With LoRA adapters: the three projections one by one, each with its low-rank branch (autodiff backward).
        def linear(h, kernel, bias, adapter):
            y = fused.dense(h, fused.cast(kernel, self.dtype), fused.cast(bias, self.dtype))
            return y if adapter is None else y + _adapter_delta(self, h, adapter, self.dtype, self.lora)

        gate, up, down = params
        return linear(act(linear(x, *gate)) * linear(x, *up), *down)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [..., T, H, D] rotated by cos/sin [..., T, D] (broadcast over heads), computed in float32."""
    xf = x.astype(jnp.float32)
    out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
    return out.astype(x.dtype)


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/dim), i < dim/2, in float32 as transformers computes it."""
    return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def scaled_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """The decoder's inverse frequencies [dim / 2] with the Llama family's scaling (config.RopeScaling), in float32
    step by step as transformers' `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`."""
    inv_freq = _inv_freq(dim, theta)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = (np.float32(2 * np.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    span = np.float32(scaling.high_freq_factor - scaling.low_freq_factor)
    smooth = ((np.float32(old_context) / wavelen - np.float32(scaling.low_freq_factor)) / span).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def mrope_axes(half: int, mrope_section, interleaved: bool = False) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) each of the head_dim/2 rotary frequencies reads: int32 [half].

    Contiguous (Qwen2.5-VL): chunk i of `mrope_section` reads axis i % 3. Interleaved (Qwen3-VL, transformers'
    `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`): frequency j reads h when j % 3 == 1 and
    j < 3 * section[1], w when j % 3 == 2 and j < 3 * section[2], else t. None: every frequency reads axis 0."""
    if mrope_section is None:
        return np.zeros(half, np.int32)
    if not interleaved:
        return np.concatenate([np.full(s, i % 3, np.int32) for i, s in enumerate(mrope_section)])
    axes = np.zeros(half, np.int32)
    for axis in (1, 2):
        axes[axis : 3 * mrope_section[axis] : 3] = axis
    return axes


def mrope_cos_sin(
    position_ids: Array,
    head_dim: int,
    theta: float,
    mrope_section,
    scaling: RopeScaling | None = None,
    interleaved: bool = False,
) -> tuple[Array, Array]:
    """Multimodal RoPE tables.

    Args:
      position_ids: int [3, B, T] (t, h, w positions) or [B, T] (text only: same position on every axis).
      mrope_section: how the head_dim/2 frequencies are split between the t, h and w axes (`mrope_axes`), or None
        for plain 1-D RoPE.
      scaling: the Llama family's frequency scaling (`scaled_inv_freq`), or None.
      interleaved: Qwen3-VL's interleaved layout of the sections (`mrope_axes`).
    Returns cos, sin: float32 [B, T, head_dim].
    """
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
    half = head_dim // 2
    axis_of_freq = mrope_axes(half, mrope_section, interleaved)
    pos = position_ids.astype(jnp.float32)[axis_of_freq]  # [half, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * scaled_inv_freq(head_dim, theta, scaling)  # [B, T, half]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rotary_pos: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """2-D RoPE of the vision tower: rotary_pos int [..., 2] (h, w) -> cos, sin float32 [..., head_dim]."""
    inv = _inv_freq(head_dim // 2, theta)  # [head_dim / 4]
    freqs = rotary_pos.astype(jnp.float32)[..., None] * inv  # [..., 2, head_dim / 4]
    freqs = freqs.reshape(*freqs.shape[:-2], -1)  # h frequencies then w frequencies
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _text_cos_sin(position_ids: Array, c: TextConfig) -> tuple[Array, Array]:
    """The decoder's RoPE tables for `position_ids` ([3, B, T] or [B, T]): float32 [B, T, head_dim] each."""
    return mrope_cos_sin(
        position_ids, c.resolved_head_dim, c.rope_theta, c.mrope_section, c.rope_scaling, c.mrope_interleaved
    )


# Names of the activations a remat policy may keep (`jax.ad_checkpoint.checkpoint_name`).
ATTENTION_INPUTS, ATTENTION_OUTPUT = "attention_inputs", "attention_output"


def _remat_policy(policy: str):
    """What a rematerialised layer keeps for its backward (config.REMAT_POLICIES):
    * "full": only the layer's input; the backward recomputes the whole layer;
    * "attention": also the attention's rotated q, k, v and its output, so the backward recomputes the
      projections and the MLP but not the attention (the cheapest FLOPs to keep per byte: about 2-3 x D per token);
    * "dots": every matmul output without a batch dimension (projections, MLP, LM head): little recomputation,
      about as much memory as no remat."""
    if policy == "full":
        return None
    if policy == "attention":
        return jax.checkpoint_policies.save_only_these_names(ATTENTION_INPUTS, ATTENTION_OUTPUT)
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _maybe_remat(layer_cls, policy: str):
    if policy == "none":
        return layer_cls
    return nn.remat(layer_cls, prevent_cse=False, policy=_remat_policy(policy))


def _attend(q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool, implementation: str) -> Array:
    """`attention` with the remat names around it: q, k, v [B, T, heads, Dh] -> [B, T, H, Dh]."""
    q, k, v = (checkpoint_name(x, ATTENTION_INPUTS) for x in (q, k, v))
    out = attention(q, k, v, segment_ids, causal=causal, implementation=implementation)
    return checkpoint_name(out, ATTENTION_OUTPUT)


# ----------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array, is_full_attention: Array) -> Array:
        """x [S, L, D] (image slots), cos/sin [S, L, Dh], segment_ids [S, L] -> [S, L, D].

        Full-attention blocks attend within each frame of a slot ([S, L, L] scores); window blocks within each run
        of W = `config.window_patches` positions ([S * L / W, W, W]). The flag is traced (one scan over all blocks), so
        both shapes are compiled and `lax.cond` runs the block's own."""
        c = self.config
        s, length = x.shape[:2]
        qkv = _dense(3 * c.hidden_size, True, self.dtype, self.param_dtype, "qkv", self.lora)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(s, length, 3, c.num_heads, c.head_dim), 2, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (constrain(t, BATCH, None, "tensor", None) for t in (q, k, v))
        w = c.window_patches

        def full(q, k, v):
            return _attend(q, k, v, segment_ids, causal=False, implementation=self.implementation)

        def windows(q, k, v):
            cut = lambda t: t.reshape(s * length // w, w, *t.shape[2:])  # noqa: E731
            out = _attend(cut(q), cut(k), cut(v), cut(segment_ids), causal=False, implementation=self.implementation)
            return out.reshape(q.shape)

        out = jax.lax.cond(is_full_attention, full, windows, q, k, v)
        return _dense(c.hidden_size, True, self.dtype, self.param_dtype, "proj", self.lora)(out.reshape(x.shape))


class VisionBlock(nn.Module):
    """Pre-norm ViT block; attends within its window, or within the whole frame on full-attention blocks."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, is_full_attention):
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype)
        attn = VisionAttention(c, self.dtype, self.param_dtype, self.implementation, self.lora, name="attn")
        x = x + attn(norm(name="norm1")(x), cos, sin, segment_ids, is_full_attention)
        mlp = GatedMLP(
            c.hidden_size, c.intermediate_size, True, c.hidden_act, self.dtype, self.param_dtype, self.lora, name="mlp"
        )
        x = x + mlp(norm(name="norm2")(x))
        return constrain(x, BATCH, None, None), None


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 merge unit (4 consecutive patches) -> Linear -> GELU -> Linear(out_hidden_size):
    [..., L, D] -> [..., L / merge_unit, out_hidden_size]."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        width = c.hidden_size * c.merge_unit
        x = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="ln_q")(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] // c.merge_unit, width)  # merge units are contiguous
        x = _dense(width, True, self.dtype, self.param_dtype, "fc1", self.lora)(x)
        x = jax.nn.gelu(x, approximate=False)
        return _dense(c.out_hidden_size, True, self.dtype, self.param_dtype, "fc2", self.lora)(x)


class VisionTower(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    remat: str = "none"
    implementation: str = "xla"
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, pixel_values: Array, vision_inputs: dict[str, Array]) -> Array:
        """pixel_values [S, L, C*T*p*p] in the slot layout of `jaxvlm.processing.vision_layout` -> merged image
        features [S * L / merge_unit, out_hidden_size] in processor order (image after image; the first
        `num_merged` rows are the images' tokens, the rest padding), ready to be spliced at the image tokens, and None
        (this tower has no DeepStack features)."""
        c = self.config
        # The Conv3d patch embedding (kernel = stride = (T, p, p), no bias) is a matmul over the flattened patch.
        x = constrain(pixel_values.astype(self.dtype), BATCH, None, None)
        x = _dense(c.hidden_size, False, self.dtype, self.param_dtype, "patch_embed")(x)
        cos, sin = vision_cos_sin(vision_inputs["rotary_pos"], c.head_dim, c.rope_theta)
        is_full = jnp.asarray([i in c.fullatt_block_indexes for i in range(c.depth)])
        blocks = nn.scan(
            _maybe_remat(VisionBlock, self.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.depth,
        )(c, self.dtype, self.param_dtype, self.implementation, self.lora, name="blocks")
        x, _ = blocks(x, cos, sin, vision_inputs["segment_ids"], is_full)
        merged = PatchMerger(c, self.dtype, self.param_dtype, self.lora, name="merger")(x)  # [S, L / unit, D_out]
        merged = merged.reshape(-1, merged.shape[-1])
        return merged[vision_inputs["merge_inverse"].reshape(-1)], None  # back to processor order; no DeepStack


# ----------------------------------------------------------------------------------------------------------
# Text decoder
# ----------------------------------------------------------------------------------------------------------


def cached_attention(
    q: Array, prompt_k: Array, prompt_v: Array, prompt_mask: Array, gen_k: Array, gen_v: Array, gen_mask: Array
) -> Array:
    """One decode step of grouped-query attention over a prompt cache shared by a group and a per-row cache.

    The G rollouts of a prompt read that prompt's keys once (a [G, D] x [D, T] matmul per kv head) instead of G
    copies of them, so the prompt cache is stored once per prompt, not once per rollout.

    Args:
      q: [B*G, H, D] queries of the new token (rows grouped prompt-major: row b*G + g is rollout g of prompt b).
      prompt_k, prompt_v: [B, T, K, D]; prompt_mask: bool [B, T] (False at left padding).
      gen_k, gen_v: [B*G, N, K, D] keys/values of the generated tokens (including the new one);
      gen_mask: bool [N], True at the positions written so far.
    Returns [B*G, H, D]. Scores and softmax in float32.
    """
    b, t, kv_heads, d = prompt_k.shape
    bg, h = q.shape[0], q.shape[1]
    g, n = bg // b, gen_k.shape[1]
    q = q.reshape(b, g, kv_heads, h // kv_heads, d)
    gen_k = gen_k.reshape(b, g, n, kv_heads, d)
    gen_v = gen_v.reshape(b, g, n, kv_heads, d)
    scale = d**-0.5
    s_prompt = jnp.einsum("bgkhd,btkd->bgkht", q, prompt_k, preferred_element_type=jnp.float32) * scale
    s_gen = jnp.einsum("bgkhd,bgnkd->bgkhn", q, gen_k, preferred_element_type=jnp.float32) * scale
    neg = jnp.finfo(jnp.float32).min
    s_prompt = jnp.where(prompt_mask[:, None, None, None, :], s_prompt, neg)
    s_gen = jnp.where(gen_mask, s_gen, neg)
    probs = jax.nn.softmax(jnp.concatenate([s_prompt, s_gen], axis=-1), axis=-1).astype(prompt_v.dtype)
    out = jnp.einsum("bgkht,btkd->bgkhd", probs[..., :t], prompt_v) + jnp.einsum(
        "bgkhn,bgnkd->bgkhd", probs[..., t:], gen_v
    )
    return out.reshape(bg, h, d)


class TextAttention(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, ctx: dict, layer, cache):
        """Self-attention in one of two modes, chosen by the (static) structure of `cache`:

        * `cache is None` (training, scoring, prefill): causal attention over `x` [B, T, D] within each row's
          `ctx["segment_ids"]` [B, T] (the attention mask: 0 = padding); returns (out [B, T, D], (k, v)
          [B, T, K, Dh] each, the new cache entries).
        * decode: `x` [B*G, 1, D] is one new token per row; `cache` = (gen_k, gen_v) [L, B*G, N, K, Dh] for all
          layers (carried through the layer scan so the write is in place), `layer` = (layer index, prompt_k,
          prompt_v [B, T, K, Dh]); `ctx` holds `prompt_mask` [B, T], `step` (write position) and `gen_mask` [N].
          Returns (out [B*G, 1, D], updated cache).
        """
        c = self.config
        hd, b, t = c.resolved_head_dim, x.shape[0], x.shape[1]
        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        q = dense(c.num_attention_heads * hd, c.qkv_bias, name="q_proj")(x).reshape(b, t, c.num_attention_heads, hd)
        k = dense(c.num_key_value_heads * hd, c.qkv_bias, name="k_proj")(x).reshape(b, t, c.num_key_value_heads, hd)
        v = dense(c.num_key_value_heads * hd, c.qkv_bias, name="v_proj")(x).reshape(b, t, c.num_key_value_heads, hd)
        if c.qk_norm:  # Qwen3: RMSNorm over each head's [Dh] before the rotation
            q = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (constrain(t, BATCH, None, "tensor", None) for t in (q, k, v))
        if cache is None:
            out = _attend(q, k, v, ctx["segment_ids"], causal=True, implementation=self.implementation)
            new = (k, v)
        else:
            index, prompt_k, prompt_v = layer
            gen_k, gen_v = cache
            at = (index, 0, ctx["step"], 0, 0)
            gen_k = jax.lax.dynamic_update_slice(gen_k, k[None].astype(gen_k.dtype), at)
            gen_v = jax.lax.dynamic_update_slice(gen_v, v[None].astype(gen_v.dtype), at)
            out = cached_attention(
                q[:, 0], prompt_k, prompt_v, ctx["prompt_mask"], gen_k[index], gen_v[index], ctx["gen_mask"]
            )[:, None]
            new = (gen_k, gen_v)
        return dense(c.hidden_size, c.o_bias, name="o_proj")(out.reshape(b, t, -1)), new


def add_deepstack(x: Array, layer: Array, deepstack: dict) -> Array:
    """Qwen3-VL's DeepStack: after decoder layer i < k, add the i-th DeepStack image features at the image tokens.

    x [B, T, D]; layer: this layer's index (int32 scalar, traced in the layer scan); deepstack: `features`
    [k, Q, D] (processor order), `index` int32 [B, T] (the feature row of each image token, clipped), `mask` bool
    [B, T] (image tokens). Layers >= k skip the gather (`lax.cond`)."""
    features = deepstack["features"]
    k = features.shape[0]

    def add(x):
        rows = features[jnp.minimum(layer, k - 1)][deepstack["index"]].astype(x.dtype)  # [B, T, D]
        return x + jnp.where(deepstack["mask"][..., None], rows, jnp.zeros((), x.dtype))

    return jax.lax.cond(layer < k, add, lambda x: x, x)


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    @nn.compact
    def __call__(self, carry, cos, sin, ctx, layer):
        """carry = (x, decode cache or None); see `TextAttention` for the modes. Returns (carry, (k, v) or None)."""
        x, cache = carry
        c = self.config
        norm = functools.partial(RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype)
        attn = TextAttention(c, self.dtype, self.param_dtype, self.implementation, self.lora, name="self_attn")
        out, new = attn(norm(name="input_layernorm")(x), cos, sin, ctx, layer, cache)
        x = x + out
        mlp = GatedMLP(
            c.hidden_size,
            c.intermediate_size,
            c.mlp_bias,
            c.hidden_act,
            self.dtype,
            self.param_dtype,
            self.lora,
            name="mlp",
        )
        x = constrain(x + mlp(norm(name="post_attention_layernorm")(x)), BATCH, None, None)
        if cache is None:
            if "deepstack" in ctx:
                x = add_deepstack(x, layer, ctx["deepstack"])
            return (x, None), new  # per-layer (k, v), stacked by the scan into [L, B, T, K, Dh]
        return (x, new), None


class TextModel(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    remat: str = "none"
    implementation: str = "xla"
    lora: LoraConfig | None = None  # adapter settings (ModelConfig.lora); None: a model without adapters

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=_INIT
        )
        self.layers = nn.scan(
            _maybe_remat(DecoderLayer, self.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_hidden_layers,
        )(c, self.dtype, self.param_dtype, self.implementation, self.lora)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

    def embed(self, input_ids: Array) -> Array:
        return self.embed_tokens(input_ids)

    def attend(self, hidden: Array) -> Array:
        """Tied LM head: hidden [..., D] @ embedding.T -> [..., V]."""
        return self.embed_tokens.attend(hidden)

    def __call__(
        self,
        inputs_embeds: Array,
        position_ids: Array,
        attention_mask: Array,
        *,
        return_kv: bool = False,
        deepstack: dict | None = None,
    ):
        """inputs_embeds [B, T, D], position_ids int [3, B, T] or [B, T], attention_mask [B, T] -> hidden [B, T, D]
        (and, with `return_kv`, the keys and values of every layer, [L, B, T, K, Dh] each: a prefill cache).
        When the cache is not returned, jit drops it (dead code), so training does not pay for it.
        deepstack: Qwen3-VL's DeepStack image features (`add_deepstack`), or None."""
        c = self.config
        cos, sin = _text_cos_sin(position_ids, c)
        cos, sin = (constrain(t, BATCH, None, None) for t in (cos, sin))
        x = constrain(inputs_embeds.astype(self.dtype), BATCH, None, None)
        ctx = {"segment_ids": constrain(attention_mask.astype(jnp.int32), BATCH, None)}
        if deepstack is not None:
            ctx["deepstack"] = deepstack
        layer = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        (x, _), kv = self.layers((x, None), cos, sin, ctx, layer)
        x = self.norm(x)
        return (x, kv) if return_kv else x

    def decode(self, inputs_embeds: Array, position_ids: Array, cache: dict) -> tuple[Array, dict]:
        """One cached decode step for every row.

        Args:
          inputs_embeds: [B*G, 1, D], the embedding of each row's newest token.
          position_ids: int [3, B*G, 1] (or [B*G, 1]) M-RoPE position of that token.
          cache: `prompt_k`, `prompt_v` [L, B, T, K, Dh], `prompt_mask` bool [B, T], `gen_k`, `gen_v`
            [L, B*G, N, K, Dh], `step` int32 scalar (where the new token's keys are written).
        Returns (hidden [B*G, 1, D], cache with `gen_k`/`gen_v` updated at `step`).
        """
        c = self.config
        cos, sin = _text_cos_sin(position_ids, c)
        n = cache["gen_k"].shape[2]
        ctx = {"prompt_mask": cache["prompt_mask"], "step": cache["step"], "gen_mask": jnp.arange(n) <= cache["step"]}
        layer = (jnp.arange(c.num_hidden_layers), cache["prompt_k"], cache["prompt_v"])
        carry = (constrain(inputs_embeds.astype(self.dtype), BATCH, None, None), (cache["gen_k"], cache["gen_v"]))
        (x, (gen_k, gen_v)), _ = self.layers(carry, cos, sin, ctx, layer)
        return self.norm(x), {**cache, "gen_k": gen_k, "gen_v": gen_v}


# ----------------------------------------------------------------------------------------------------------
# The full model
# ----------------------------------------------------------------------------------------------------------


def splice_image_features(
    embeds: Array, input_ids: Array, features: Array, image_token_id: int, image_offset: Array | None = None
) -> Array:
    """Replace the embeddings at image-token positions by image features.

    embeds [B, T, D], input_ids [B, T], features [Q, D] in processor order -> [B, T, D]. Row r's k-th image token
    takes features[image_offset[r] + k]. image_offset int [B] defaults to the image tokens of the rows before r
    (rows' images one after the other, as a processor lays them out); a batch whose rows share images (a prompt's
    G rollouts) passes each row the offset of its images' features instead.
    """
    index, is_image = image_feature_index(input_ids, image_token_id, features.shape[0], image_offset)
    return jnp.where(is_image[..., None], features[index].astype(embeds.dtype), embeds)


def image_feature_index(
    input_ids: Array, image_token_id: int, num_features: int, image_offset: Array | None = None
) -> tuple[Array, Array]:
    """(index int32 [B, T], is_image bool [B, T]): the feature row each image token takes (clipped into
    [0, num_features)), as `splice_image_features` describes."""
    is_image = input_ids == image_token_id
    if image_offset is None:
        counts = jnp.sum(is_image, axis=-1)
        image_offset = jnp.cumsum(counts) - counts
    index = image_offset.reshape(-1, 1) + jnp.cumsum(is_image, axis=-1) - 1
    return jnp.clip(index, 0, num_features - 1).astype(jnp.int32), is_image


def _concrete(x, name: str, hint: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name} is traced (inside jit): {hint}")
    return np.asarray(x)


class Qwen25VL(nn.Module):
    """Qwen2.5-VL for conditional generation; with `config.vision=None` a text-only Qwen2 causal LM.

    `model.apply({"params": params}, input_ids, attention_mask, pixel_values, image_grid_thw)` returns logits
    [B, T, V] in the compute dtype. Other entry points (`method=`): `encode` (final hidden states [B, T, D]),
    `lm_logits` (hidden -> logits), `image_features` (vision tower only).
    """

    config: ModelConfig
    # The vision tower: pixel_values [S, L, patch_dim] + vision_inputs -> (merged features [Q, D], DeepStack
    # features [k, Q, D] or None). Qwen3-VL's subclass (`qwen3_vl.Qwen3VL`) replaces it.
    vision_tower_class = VisionTower

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if cfg.vision is not None:
            self.visual = self.vision_tower_class(
                cfg.vision,
                dtype,
                param_dtype,
                cfg.remat,
                resolve_implementation(cfg.attention, dtype=dtype, head_dim=cfg.vision.head_dim),
                cfg.lora,
            )
        self.language_model = TextModel(
            cfg.text,
            dtype,
            param_dtype,
            cfg.remat,
            resolve_implementation(cfg.attention, dtype=dtype, head_dim=cfg.text.resolved_head_dim),
            cfg.lora,
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.text.vocab_size, False, dtype, param_dtype, "lm_head")

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        pixel_values: Array | None = None,
        image_grid_thw=None,
        position_ids: Array | None = None,
        *,
        vision_inputs: dict[str, Array] | None = None,
        image_offset: Array | None = None,
        rope_deltas: Array | None = None,
        mm_token_type_ids: Array | None = None,
    ) -> Array:
        """Logits [B, T, V]. See `encode` for the arguments."""
        hidden = self.encode(
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            position_ids,
            vision_inputs=vision_inputs,
            image_offset=image_offset,
        )
        return self.lm_logits(hidden)

    def lm_logits(self, hidden: Array) -> Array:
        """hidden [..., D] -> logits [..., V]."""
        if self.config.tie_word_embeddings:
            return self.language_model.attend(hidden)
        return self.lm_head(hidden)

    def image_features(self, pixel_values: Array, image_grid_thw=None, *, vision_inputs=None) -> Array:
        """Merged image features [S * L / merge_unit, D_text], processor order (see `VisionTower`).

        pixel_values: [S, L, patch_dim] in the slot layout with its `vision_inputs` (what the data pipeline, the
        sampler and the steps feed), or a processor's [N, patch_dim] with a concrete `image_grid_thw` (laid out
        here, on the host)."""
        return self.vision_outputs(pixel_values, image_grid_thw, vision_inputs=vision_inputs)[0]

    def vision_outputs(self, pixel_values: Array, image_grid_thw=None, *, vision_inputs=None):
        """(merged image features [Q, D_text], DeepStack features [k, Q, D_text] or None); see `image_features`."""
        if self.config.vision is None:
            raise ValueError(
                f"this is a text-only model (model_type={self.config.model_type!r}): it cannot take pixel_values"
            )
        if vision_inputs is None:
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw (or the slot layout's vision_inputs)")
            from jaxvlm.processing.vision import layout_images

            hint = "lay the images out on the host: jaxvlm.processing.layout_images(pixel_values, grid, config)"
            pixel_values, vision_inputs = layout_images(
                _concrete(pixel_values, "pixel_values", hint),
                _concrete(image_grid_thw, "image_grid_thw", hint),
                self.config.vision,
            )
        elif pixel_values.ndim != 3:
            raise ValueError(
                f"with vision_inputs, pixel_values must be in the slot layout [S, L, patch_dim], got "
                f"shape {pixel_values.shape}: see jaxvlm.processing.layout_images"
            )
        return self.visual(pixel_values, vision_inputs)

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        pixel_values: Array | None = None,
        image_grid_thw=None,
        position_ids: Array | None = None,
        *,
        vision_inputs: dict[str, Array] | None = None,
        image_offset: Array | None = None,
        rope_deltas: Array | None = None,
        mm_token_type_ids: Array | None = None,
    ) -> Array:
        """Final-norm hidden states [B, T, D].

        Args:
          input_ids: int [B, T], left- or right-padded.
          attention_mask: [B, T], 1 for real tokens (default: all ones).
          pixel_values: the batch's images: float [S, L, C*T*p*p] in the slot layout with `vision_inputs` (both from
            `jaxvlm.processing.layout_images`), or a processor's [N, C*T*p*p] with a concrete `image_grid_thw`.
          image_grid_thw: int [n, 3]; needed on the host unless `vision_inputs` and `position_ids` are given.
          position_ids: int [3, B, T] M-RoPE positions, or [B, T]. Default: `get_rope_index` when there are images
            (host side), else positions counted from the first real token (jittable).
          vision_inputs: the slot layout's index arrays (`jaxvlm.processing.layout_images`).
          image_offset: int [B], where each row's image features start in processor order (default: after the
            previous rows'; see `splice_image_features`).
          rope_deltas, mm_token_type_ids: accepted so processor outputs can be splatted in, and unused (deltas
            matter only when decoding with a cache; image positions are read off input_ids).
        """
        del rope_deltas, mm_token_type_ids
        embeds, position_ids, attention_mask, deepstack = self._embed_inputs(
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs, image_offset
        )
        return self.language_model(embeds, position_ids, attention_mask, deepstack=deepstack)

    def prefill(
        self,
        input_ids: Array,
        attention_mask: Array,
        pixel_values: Array | None = None,
        image_grid_thw=None,
        position_ids: Array | None = None,
        *,
        vision_inputs: dict[str, Array] | None = None,
        image_offset: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        """Run the prompt (vision tower included) once; the start of cached generation.

        Prompts must be left-padded so every row's last column is a real token. Arguments as for `encode`.
        Returns (logits of the last position [B, V], (keys, values) [L, B, T, K, Dh] each).
        """
        embeds, position_ids, attention_mask, deepstack = self._embed_inputs(
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs, image_offset
        )
        hidden, kv = self.language_model(embeds, position_ids, attention_mask, return_kv=True, deepstack=deepstack)
        return self.lm_logits(hidden[:, -1]), kv

    def decode_step(self, token_ids: Array, position_ids: Array, cache: dict) -> tuple[Array, dict]:
        """token_ids int [B*G], position_ids int [3, B*G] -> (next-token logits [B*G, V], updated cache).

        See `TextModel.decode` for the cache layout; `jaxvlm.sampling` builds and owns it."""
        embeds = self.language_model.embed(token_ids[:, None])
        hidden, cache = self.language_model.decode(embeds, position_ids[..., None], cache)
        return self.lm_logits(hidden[:, 0]), cache

    def _embed_inputs(
        self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs, image_offset
    ):
        """Token embeddings with image features spliced in, plus positions, mask (defaults filled in) and the
        DeepStack features for the decoder (`add_deepstack`; None without images or without DeepStack)."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        embeds = self.language_model.embed(input_ids)
        deepstack = None
        if pixel_values is not None:
            features, deepstack_features = self.vision_outputs(
                pixel_values, image_grid_thw, vision_inputs=vision_inputs
            )
            if image_grid_thw is not None and not isinstance(input_ids, jax.core.Tracer):
                _check_image_token_count(np.asarray(input_ids), np.asarray(image_grid_thw), cfg)
            embeds = splice_image_features(embeds, input_ids, features, cfg.image_token_id, image_offset)
            if deepstack_features is not None:
                index, mask = image_feature_index(
                    input_ids, cfg.image_token_id, deepstack_features.shape[1], image_offset
                )
                deepstack = {"features": deepstack_features, "index": index, "mask": mask}
        if position_ids is None:
            position_ids = self._default_position_ids(input_ids, attention_mask, image_grid_thw)
        return embeds, position_ids, attention_mask, deepstack

    def _default_position_ids(self, input_ids, attention_mask, image_grid_thw):
        if image_grid_thw is None:
            return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        from jaxvlm.processing.rope import get_rope_index

        hint = "pass position_ids from jaxvlm.processing.get_rope_index (the Processor returns them)"
        position_ids, _ = get_rope_index(
            _concrete(input_ids, "input_ids", hint),
            _concrete(attention_mask, "attention_mask", hint),
            _concrete(image_grid_thw, "image_grid_thw", hint),
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )
        return jnp.asarray(position_ids)


def compute_dtype_params(config: ModelConfig, params):
    """`params` with every floating leaf in the compute dtype (`config.dtype`). The model casts each parameter to
    the compute dtype where it uses it, so applying the model to these gives the same values; for inference, where
    casting once beats casting at every step (the sampler's decode loop)."""
    dtype = jnp.dtype(config.dtype)
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def head_weight(config: ModelConfig, params: dict) -> Array:
    """The LM head as a [V, D] matrix (the embedding table when tied), in the parameters' dtype."""
    if config.tie_word_embeddings:
        return params["language_model"]["embed_tokens"]["embedding"]
    return params["lm_head"]["kernel"].T


def _check_image_token_count(input_ids: np.ndarray, grid: np.ndarray, cfg: ModelConfig) -> None:
    n_tokens = int((input_ids == cfg.image_token_id).sum())
    n_features = int(np.asarray(grid).reshape(-1, 3).prod(-1).sum()) // cfg.vision.merge_unit
    if n_tokens != n_features:
        raise ValueError(
            f"Image features and image tokens do not match: {n_tokens} image tokens (id {cfg.image_token_id}) in "
            f"input_ids but image_grid_thw gives {n_features} features (was the prompt truncated?)"
        )


# ----------------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------------


def _init_inputs(cfg: ModelConfig) -> dict:
    """Smallest inputs that touch every parameter: one image of one merge unit plus two text tokens."""
    from jaxvlm.processing.vision import layout_images

    if cfg.vision is None:
        ids = np.zeros((1, 2), np.int32)
        return dict(input_ids=ids, attention_mask=np.ones_like(ids), position_ids=np.zeros((3, 1, 2), np.int32))
    m = cfg.vision.spatial_merge_size
    grid = np.array([[1, m, m]])
    ids = np.array([[0, cfg.image_token_id, 0]], np.int32)
    pixel_values, vision_inputs = layout_images(np.zeros((m * m, cfg.vision.patch_dim), np.float32), grid, cfg.vision)
    return dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        pixel_values=pixel_values,
        position_ids=np.zeros((3, 1, 3), np.int32),
        vision_inputs=vision_inputs,
    )
