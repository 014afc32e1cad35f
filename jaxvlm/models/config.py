"""Model configuration for the Qwen2.5-VL and Qwen3-VL families (and text-only Qwen2 / Qwen2.5 / Qwen3, Llama).

`ModelConfig` is a frozen dataclass so a linen module can hold it as an attribute. It is read from and written
to a Hugging Face `config.json`; the layouts found in the wild are accepted:

* transformers 5.x: text fields nested under `text_config`, RoPE under `rope_parameters`;
* older hub checkpoints (transformers 4.4x): text fields at the root, `rope_theta` + `rope_scaling`
  (`{"type": "mrope", "mrope_section": [...]}`), `vision_config` nested;
* `qwen3_vl` checkpoints (Qwen3-VL 2B / 4B / 8B, Instruct and Thinking): `text_config` + `vision_config`
  (`Qwen3VisionConfig`: learned position table, DeepStack blocks), interleaved M-RoPE;
* text-only `qwen2` checkpoints (Qwen2 / Qwen2.5 LMs) and `qwen3` ones (Qwen3 LMs): flat, 1-D RoPE;
* text-only `llama` checkpoints (Llama 2 / 3.x, SmolLM2): flat, 1-D RoPE with the checkpoint's scaling (none,
  "linear" or "llama3"), biases as `attention_bias` / `mlp_bias` say (none in every released Llama).

The Qwen2, Qwen3 and Llama decoders are one module: they differ in which projections carry biases (Qwen2: q/k/v;
Llama and Qwen3: q/k/v/o when `attention_bias`, Llama's gate/up/down when `mlp_bias`), in Qwen3's q/k RMSNorm
(`qk_norm`), in the M-RoPE layout (`mrope_interleaved`) and in the RoPE frequency scaling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen2", "qwen3", "llama")
TEXT_ONLY_MODEL_TYPES = ("qwen2", "qwen3", "llama")  # decoders without a vision tower
QWEN3_MODEL_TYPES = ("qwen3_vl", "qwen3")  # the Qwen3 decoder: q/k RMSNorm, no biases
ROPE_SCALING_TYPES = ("linear", "llama3")  # besides "default" (and "mrope", Qwen2.5-VL's)
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: debugging parity (needs jax_enable_x64)
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
# np.dtype reads both as float64, JAX reads float as its default float (float32): a dtype option names its width.
_AMBIGUOUS_DTYPES = (None, float)
REMAT_POLICIES = ("none", "full", "attention", "dots")  # see qwen2_5_vl._remat_policy; "auto": `default_remat`
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")  # see jaxvlm.models.attention
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower (ViT with 2-D RoPE, window attention, 2x2 patch merger)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 2048
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6  # transformers hard-codes 1e-6 for the vision norms

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (112 px / 14 / 2 = 4 for Qwen2.5-VL)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Patches per attention window, W: 64 for Qwen2.5-VL (4 x 4 merged tokens of 2 x 2 patches)."""
        return self.window_merged**2 * self.merge_unit


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig:
    """Qwen3-VL vision tower: ViT with learned absolute position embeddings (a square table bilinearly interpolated to
    each image's grid) plus 2-D RoPE, full attention within each image, LayerNorm, a gelu-tanh MLP, the 2x2 patch
    merger, and DeepStack: the outputs of the `deepstack_visual_indexes` blocks, each through its own merger, are
    added to the decoder's hidden states at the image tokens after its first layers.

    It shares the slot layout of the Qwen2.5-VL tower (`jaxvlm.processing.vision`) with windows of one merge unit,
    so every block attends within each image (`window_merged` = 1, every block a full-attention block)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6  # transformers hard-codes 1e-6 for the vision LayerNorms

    head_dim = VisionConfig.head_dim
    patch_dim = VisionConfig.patch_dim
    merge_unit = VisionConfig.merge_unit

    @property
    def num_grid_per_side(self) -> int:
        """Side of the square position-embedding table (48 for 2304 entries)."""
        return math.isqrt(self.num_position_embeddings)

    @property
    def window_merged(self) -> int:
        return 1

    @property
    def window_patches(self) -> int:
        """One merge unit: the slot layout then pads nothing inside a frame, and attention is per frame."""
        return self.merge_unit

    @property
    def fullatt_block_indexes(self) -> tuple[int, ...]:
        return tuple(range(self.depth))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling of the Llama family, as transformers computes it (`modeling_rope_utils`):

    * "linear": every inverse frequency divided by `factor`;
    * "llama3" (Llama 3.1 / 3.2): wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
      divided by `factor`, those shorter than `original_max_position_embeddings / high_freq_factor` are kept, and the
      band between is interpolated smoothly.
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The decoder: GQA, RMSNorm, SwiGLU, (M-)RoPE. Qwen2: q/k/v biases (the defaults); Llama: `qkv_bias` and
    `o_bias` both from `attention_bias` (false in released Llamas), `mlp_bias`, and optionally `rope_scaling`."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    # Split of the head_dim/2 rotary frequencies between the (t, h, w) position axes; None = 1-D RoPE.
    mrope_section: tuple[int, ...] | None = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    qkv_bias: bool = True  # biases on q_proj, k_proj, v_proj (Qwen2: always; Llama: attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama: attention_bias)
    mlp_bias: bool = False  # biases on gate_proj, up_proj, down_proj (Llama: mlp_bias)
    rope_scaling: RopeScaling | None = None  # None: plain 1 / theta^(2i/d) frequencies
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # M-RoPE frequency j reads axis h when j % 3 == 1 and j < 3 * section[1], w when j % 3 == 2 and j < 3 * section[2],
    # else t (Qwen3-VL); False: contiguous chunks t | h | w (Qwen2.5-VL).
    mrope_interleaved: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# The decoder's linear layers (attention projections and MLP), PEFT's usual LoRA targets for a causal LM.
DEFAULT_LORA_TARGETS = (
    r"^language_model/layers/(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))$",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (`jaxvlm.models.lora`): y = x W + b + (dropout(x) A) B * alpha / rank on every linear layer
    whose path (its kernel's path without "/kernel", e.g. "language_model/layers/self_attn/q_proj") matches one of
    `targets` (regexes, `re.search`). A [.., in, rank] starts uniform(+-1/sqrt(in)) and B [.., rank, out] at zero
    (PEFT's init), so the adapted model starts as the base model."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"lora rank={self.rank!r}: must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha={self.alpha!r}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout={self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            raise ValueError("lora targets: give at least one regex over linear-layer paths")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"lora targets: {pattern!r} is not a regular expression: {error}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the model; `dtype` is the compute dtype, `param_dtype` the storage dtype.

    `dtype` and `param_dtype` take a name ("bfloat16"), an alias ("bf16") or a numpy / JAX dtype (jnp.bfloat16,
    np.float32, jnp.dtype("bfloat16")); the config holds the canonical name (one of `DTYPES`), so configs built
    from either form compare and hash equal.
    """

    text: TextConfig = TextConfig()
    vision: VisionConfig | Qwen3VisionConfig | None = VisionConfig()
    model_type: str = "qwen2_5_vl"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Numerics and memory (not part of config.json):
    remat: str = "none"  # "auto" | "none" | "full" | "attention" | "dots": what a layer keeps for its backward
    attention: str = "auto"  # "auto" | "xla" | "cudnn" | "splash": the attention kernel (jaxvlm.models.attention)
    logits_chunk: int = 512  # completion tokens per LM-head chunk when scoring (train_steps.lm_head_logprobs)
    vocab_chunk: int = 32768  # vocabulary entries per LM-head chunk when scoring (151,936 -> 5 chunks)
    lora: LoraConfig | None = None  # low-rank adapters on the targeted linear layers (`jaxvlm.models.lora`)

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "param_dtype"))
        if self.remat == "auto":
            object.__setattr__(self, "remat", default_remat(self))
        validate(self)

    def replace(self, **kwargs) -> ModelConfig:
        return dataclasses.replace(self, **kwargs)


def canonical_dtype(value: Any, argument: str = "dtype") -> str:
    """The name in `DTYPES` of a dtype option given as a name, an alias in `DTYPE_ALIASES` or a numpy / JAX dtype
    or scalar type; ValueError naming `argument` and the allowed values for anything else."""
    if isinstance(value, str):
        name = DTYPE_ALIASES.get(value, value)
    else:
        name = _numpy_dtype_name(value)
    if name not in DTYPES:
        ambiguous = " (Python's float names no width)" if value is float else ""
        raise ValueError(
            f"{argument}={value!r} is not a supported dtype{ambiguous}: use one of {DTYPES}, an alias in "
            f"{tuple(DTYPE_ALIASES)} or the numpy / JAX dtype (e.g. jnp.bfloat16, np.float32, jnp.dtype('bfloat16'))"
        )
    return name


def _numpy_dtype_name(value: Any) -> str | None:
    """numpy's name for a dtype-like object (jnp.bfloat16, np.float32, a np.dtype), None when it is not one."""
    if any(value is ambiguous for ambiguous in _AMBIGUOUS_DTYPES):
        return None
    try:
        return np.dtype(value).name
    except (TypeError, ValueError):
        return None


def num_params(cfg: ModelConfig) -> int:
    """Parameter count from the shapes (matmul weights, embeddings, biases and norms), without building anything."""
    t, v = cfg.text, cfg.vision
    hd = t.resolved_head_dim
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    layer += (
        (q + 2 * kv) * t.qkv_bias + t.hidden_size * t.o_bias + (2 * t.intermediate_size + t.hidden_size) * t.mlp_bias
    )
    layer += 2 * hd * t.qk_norm
    text = t.num_hidden_layers * (layer + 2 * t.hidden_size) + t.hidden_size + t.vocab_size * t.hidden_size
    text += 0 if cfg.tie_word_embeddings else t.vocab_size * t.hidden_size
    if v is None:
        return text
    h, i, width = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    if isinstance(v, Qwen3VisionConfig):
        block = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h  # qkv + proj, fc1 + fc2, two LayerNorms
        merger = width * width + width + width * v.out_hidden_size + v.out_hidden_size  # fc1, fc2
        merged = 2 * h + merger + len(v.deepstack_visual_indexes) * (2 * width + merger)  # + norms
        embed = v.patch_dim * h + h + v.num_position_embeddings * h
        return text + embed + v.depth * block + merged
    block = 3 * h * h + 3 * h + h * h + h + 3 * h * i + 2 * i + h + 2 * h
    merger = h + width * width + width + width * v.out_hidden_size + v.out_hidden_size
    return text + v.patch_dim * h + v.depth * block + merger


def default_remat(cfg: ModelConfig) -> str:
    """remat="auto": "none" below 0.5B parameters (activations of small models fit, and recomputing costs a third
    more FLOPs), "full" from there (what a 3B run on one accelerator needs; see BENCHMARKS.md's memory table)."""
    return "none" if num_params(cfg) < 500_000_000 else "full"


_POSITIVE_SIZES = {
    "text": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ),
    "vision": (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "in_channels",
        "patch_size",
        "temporal_patch_size",
        "spatial_merge_size",
        "window_size",
        "out_hidden_size",
        "tokens_per_second",
    ),
    "qwen3_vision": (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "in_channels",
        "patch_size",
        "temporal_patch_size",
        "spatial_merge_size",
        "out_hidden_size",
        "num_position_embeddings",
    ),
}


def _check_positive_sizes(cfg: ModelConfig) -> None:
    """Every size of the text and vision configs is a positive integer (head_dim: 0 = derived)."""
    sizes = [("text", cfg.text, name) for name in _POSITIVE_SIZES["text"]]
    if cfg.vision is not None:
        kind = "qwen3_vision" if isinstance(cfg.vision, Qwen3VisionConfig) else "vision"
        sizes += [("vision", cfg.vision, name) for name in _POSITIVE_SIZES[kind]]
    for where, section, name in sizes:
        value = getattr(section, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}.{name}={value!r}: must be a positive integer")
    head_dim = cfg.text.head_dim
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 0:
        raise ValueError(f"text.head_dim={head_dim!r}: must be a positive integer, or 0 for hidden_size // heads")


def _check_rope_scaling(r: RopeScaling) -> None:
    if r.rope_type not in ROPE_SCALING_TYPES:
        raise ValueError(f"text.rope_scaling.rope_type={r.rope_type!r}: must be one of {ROPE_SCALING_TYPES}")
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
        value = getattr(r, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"text.rope_scaling.{name}={value!r}: must be a positive finite number")
    if r.rope_type == "llama3":
        if r.high_freq_factor <= r.low_freq_factor:
            raise ValueError(
                f"text.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed "
                f"low_freq_factor={r.low_freq_factor}"
            )
        n = r.original_max_position_embeddings
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"text.rope_scaling.original_max_position_embeddings={n!r}: must be a positive integer")


def validate(cfg: ModelConfig) -> None:
    """Raise ValueError naming the offending field when the configuration cannot be built (dtype and param_dtype are
    checked as they are normalised, by `canonical_dtype`)."""
    t = cfg.text
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={cfg.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"remat={cfg.remat!r}: must be one of {REMAT_POLICIES}")
    if cfg.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={cfg.attention!r}: must be one of {ATTENTION_IMPLEMENTATIONS}")
    for name in ("logits_chunk", "vocab_chunk"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    _check_positive_sizes(cfg)
    if t.num_attention_heads % t.num_key_value_heads:
        raise ValueError(
            f"text.num_attention_heads={t.num_attention_heads} is not a multiple of "
            f"text.num_key_value_heads={t.num_key_value_heads}"
        )
    for where, act in (("text", t.hidden_act), ("vision", cfg.vision.hidden_act if cfg.vision else "silu")):
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{where}.hidden_act={act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
    hd = t.resolved_head_dim
    if hd % 2:
        raise ValueError(f"text head_dim={hd} must be even for RoPE")
    if t.mrope_section is not None and sum(t.mrope_section) != hd // 2:
        raise ValueError(f"text.mrope_section={t.mrope_section} must sum to head_dim/2={hd // 2}")
    v = cfg.vision
    if cfg.model_type in TEXT_ONLY_MODEL_TYPES and v is not None:
        raise ValueError(f"model_type={cfg.model_type!r} is text-only: vision must be None")
    if t.rope_scaling is not None:
        _check_rope_scaling(t.rope_scaling)
    # What each architecture's config.json can say about biases (to_hf_dict writes exactly that).
    qwen3 = cfg.model_type in QWEN3_MODEL_TYPES
    if cfg.model_type in ("llama", *QWEN3_MODEL_TYPES) and t.qkv_bias != t.o_bias:
        raise ValueError(
            f"text.qkv_bias={t.qkv_bias} and text.o_bias={t.o_bias}: a {cfg.model_type} model has both or neither "
            "(attention_bias)"
        )
    if cfg.model_type in ("qwen2_5_vl", "qwen2") and (
        not t.qkv_bias or t.o_bias or t.mlp_bias or t.rope_scaling is not None
    ):
        raise ValueError(
            f"model_type={cfg.model_type!r} is the Qwen2 decoder: q/k/v biases only (qkv_bias=True, o_bias=False, "
            "mlp_bias=False) and no rope_scaling"
        )
    if qwen3 and (t.mlp_bias or t.rope_scaling is not None):
        raise ValueError(f"model_type={cfg.model_type!r} is the Qwen3 decoder: no MLP biases and no rope_scaling")
    if t.qk_norm != qwen3:
        raise ValueError(
            f"text.qk_norm={t.qk_norm}: the {cfg.model_type} decoder has {'' if qwen3 else 'no '}q/k norms"
        )
    if t.mrope_interleaved and (cfg.model_type != "qwen3_vl" or t.mrope_section is None):
        raise ValueError(f"text.mrope_interleaved=True: only Qwen3-VL's M-RoPE is interleaved ({cfg.model_type})")
    wanted = {"qwen2_5_vl": VisionConfig, "qwen3_vl": Qwen3VisionConfig}.get(cfg.model_type)
    if wanted is not None and not isinstance(v, wanted):
        raise ValueError(
            f"model_type={cfg.model_type!r} needs a {wanted.__name__} vision config, got {type(v).__name__}"
        )
    if isinstance(v, Qwen3VisionConfig):
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(
                f"vision.hidden_size={v.hidden_size} / num_heads={v.num_heads} must give a head_dim divisible by 4"
            )
        if v.num_grid_per_side**2 != v.num_position_embeddings:
            raise ValueError(f"vision.num_position_embeddings={v.num_position_embeddings} must be a square")
        bad = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"vision.deepstack_visual_indexes {bad} out of range for depth={v.depth}")
        if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
            # transformers pairs the k-th merger with the k-th block in depth order; other orders would differ.
            raise ValueError(
                f"vision.deepstack_visual_indexes {list(v.deepstack_visual_indexes)} must be strictly increasing"
            )
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            raise ValueError(
                f"vision.deepstack_visual_indexes: {len(v.deepstack_visual_indexes)} DeepStack features but only "
                f"{t.num_hidden_layers} decoder layers to add them to"
            )
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision.out_hidden_size={v.out_hidden_size} must equal text.hidden_size={t.hidden_size}")
    elif v is not None:
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(
                f"vision.hidden_size={v.hidden_size} / num_heads={v.num_heads} must give a head_dim divisible by 4"
            )
        if v.window_merged < 1 or v.window_size % (v.spatial_merge_size * v.patch_size):
            raise ValueError(
                f"vision.window_size={v.window_size} must be a positive multiple of "
                f"patch_size*spatial_merge_size={v.patch_size * v.spatial_merge_size}"
            )
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"vision.fullatt_block_indexes {bad} out of range for depth={v.depth}")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint's file (config.json, a .safetensors file, the shard index) is malformed, inconsistent, or describes
    a model jaxvlm cannot build; the message names the file and the field or tensor."""


# Every integer field of a config.json is at most this: token ids are int32 on the device, and no size of a real model
# comes near it.
INT32_MAX = 2**31 - 1
# Patches per vision attention window (Qwen2.5-VL: 64). The vision tower lays images out in slots of whole windows,
# so this bounds the memory a config can ask for before any weight is read.
MAX_WINDOW_PATCHES = 65536
FLOAT32_MAX = float(np.finfo(np.float32).max)
TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_REQUIRED = object()  # a field without a default


def _json_text(value: Any) -> str:
    """A config value as JSON spells it (null, true, "64", 64.5), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_requirement(value: Any, minimum: int) -> str:
    """What an integer field must be, worded for the value it holds."""
    if _is_int(value) and value > INT32_MAX:
        return f"at most {INT32_MAX}"
    return {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")


class _Fields:
    """One JSON object of a config.json, read field by field: every reader checks its value's type and range and
    raises CheckpointError naming the file and the field's path (e.g. `vision_config.depth`).

    Integers must be JSON integers (not floats, strings or booleans) in [minimum, INT32_MAX]; numbers may be integers
    or floats, finite and positive; flags must be true / false. A field that is absent takes its default; null is a
    value like any other (rejected) except where a reader documents what it means."""

    def __init__(self, d: dict[str, Any], file: str, path: str = ""):
        self.d, self.file, self.path = d, file, path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {self.name(key)}: {message}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.d:
            return self.d[key]
        if default is _REQUIRED:
            raise self.error(key, "missing")
        return default

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
        value = self._get(key, default)
        if not _is_int(value) or not minimum <= value <= INT32_MAX:
            raise self.error(key, f"must be {_int_requirement(value, minimum)}, got {_json_text(value)}")
        return value

    def optional_integer(self, key: str, minimum: int = 0) -> int | None:
        """An integer, or None where the field is absent or null."""
        return None if self.d.get(key) is None else self.integer(key, minimum=minimum)

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        """A positive number a float32 holds (norm epsilons and RoPE bases are used in float32)."""
        value = self._get(key, default)
        if not (_is_int(value) or isinstance(value, float)) or not 0 < value <= sys.float_info.max:
            raise self.error(key, f"must be a positive finite number, got {_json_text(value)}")
        if value > FLOAT32_MAX:
            raise self.error(key, f"must be at most {FLOAT32_MAX:.7g} (it is used in float32), got {_json_text(value)}")
        return float(value)

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_json_text(value)}")
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or value not in choices:
            raise self.error(key, f"must be one of {list(choices)}, got {_json_text(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        """A string, or None where the field is absent or null."""
        value = self.d.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_json_text(value)}")
        return value

    def integers(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> tuple[int, ...]:
        value = self._get(key, default)
        if not isinstance(value, (list, tuple)):
            raise self.error(key, f"must be a list of integers, got {_json_text(value)}")
        for i, item in enumerate(value):
            if not _is_int(item) or not minimum <= item <= INT32_MAX:
                raise self.error(f"{key}[{i}]", f"must be {_int_requirement(item, minimum)}, got {_json_text(item)}")
        return tuple(value)

    def token_ids(self, key: str) -> int | tuple[int, ...] | None:
        """A token id, a list of them (eos_token_id), or None where the field is absent or null."""
        value = self.d.get(key)
        if isinstance(value, list):
            return self.integers(key)
        return self.optional_integer(key)

    def section(self, key: str, required: bool = False) -> _Fields | None:
        """The nested object `key`, or None where it is absent or null (an error when `required`)."""
        value = self.d.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be a JSON object, got {_json_text(value) if key in self.d else 'nothing'}")
        return _Fields(value, self.file, self.name(key))


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """How one model_type's config.json describes its decoder: what it may hold, and the value of each field it leaves
    out."""

    rope_types: tuple[str, ...] = ("default", "mrope")  # the rope_type values the config may name
    rope_theta: float = 1000000.0
    head_dim: int | None = None  # None: an absent or null head_dim means hidden_size // num_attention_heads
    num_key_value_heads: int | None = None  # None: absent means one per query head (null always does)
    max_position_embeddings: int = 32768
    multimodal: bool = True  # False: 1-D RoPE only, an mrope_section is an error
    mrope_section: tuple[int, ...] | None = None  # the section when the config names none (None: 1-D RoPE)
    attention_bias: bool = False  # q/k/v/o biases from attention_bias (Llama, Qwen3); else Qwen2's q/k/v biases
    mlp_bias: bool = False  # MLP biases from mlp_bias (Llama)
    qwen3: bool = False  # q/k RMSNorm, and an M-RoPE is interleaved


_DECODERS = {
    "qwen2_5_vl": _Decoder(mrope_section=(16, 24, 24)),
    "qwen2": _Decoder(),
    "llama": _Decoder(
        rope_types=("default", "mrope", *ROPE_SCALING_TYPES), multimodal=False, attention_bias=True, mlp_bias=True
    ),
    # Qwen3Config and Qwen3VLTextConfig: head_dim 128 unless given (never derived; null is refused), 32 KV heads unless
    # given, default_theta 1e4 and 5e5. transformers' Qwen3VLTextRotaryEmbedding interleaves whatever
    # rope_parameters.mrope_interleaved says, with the section [24, 20, 20] where none is named; only the "default"
    # rope_type builds.
    "qwen3": _Decoder(
        rope_types=("default",),
        rope_theta=10000.0,
        head_dim=128,
        num_key_value_heads=32,
        multimodal=False,
        attention_bias=True,
        qwen3=True,
    ),
    "qwen3_vl": _Decoder(
        rope_types=("default",),
        rope_theta=500000.0,
        head_dim=128,
        num_key_value_heads=32,
        max_position_embeddings=128000,
        mrope_section=(24, 20, 20),
        attention_bias=True,
        qwen3=True,
    ),
}


def _rope(f: _Fields, decoder: _Decoder) -> tuple[float, tuple[int, ...] | None, str, RopeScaling | None]:
    """(rope_theta, mrope_section, the section's field path, the frequency scaling) from `rope_parameters` (5.x) or
    `rope_theta` + `rope_scaling` (4.x). A scaling ("linear", "llama3") is read where the decoder allows it (Llama)."""
    params, scaling = f.section("rope_parameters"), f.section("rope_scaling")
    if params is not None and "rope_theta" in params.d:
        theta = params.number("rope_theta")
    else:
        theta = f.number("rope_theta", decoder.rope_theta)
    rope_scaling = None
    for source in (s for s in (params, scaling) if s is not None):
        key = "rope_type" if source.d.get("rope_type") is not None else "type"
        rope_type = source.optional_string(key)
        if rope_type is not None:
            if rope_type not in decoder.rope_types:
                raise source.error(
                    key, f"{_json_text(rope_type)} is not supported (supported: {', '.join(decoder.rope_types)})"
                )
            if rope_type in ROPE_SCALING_TYPES:
                rope_scaling = _rope_scaling(source, rope_type, f.integer("max_position_embeddings", 32768))
            break
    for source in (s for s in (params, scaling, f) if s is not None):
        factor = source.d.get("partial_rotary_factor")
        if factor is not None and factor != 1:
            raise source.error(
                "partial_rotary_factor", f"{_json_text(factor)} is not supported (only 1: RoPE on the whole head)"
            )
    for source in (s for s in (params, scaling) if s is not None):
        if source.d.get("mrope_section") is not None:
            return theta, source.integers("mrope_section"), source.name("mrope_section"), rope_scaling
    return theta, None, f.name("rope_parameters") + ".mrope_section", rope_scaling


def _rope_scaling(source: _Fields, rope_type: str, max_positions: int) -> RopeScaling:
    """The scaling fields of a rope_parameters / rope_scaling object (transformers' defaults where it has them)."""
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=source.number("factor"))
    low, high = source.number("low_freq_factor"), source.number("high_freq_factor")
    if high <= low:
        raise source.error("high_freq_factor", f"{high} must exceed {source.name('low_freq_factor')}={low}")
    return RopeScaling(
        rope_type="llama3",
        factor=source.number("factor"),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=source.integer("original_max_position_embeddings", max_positions),
    )


def _text_from_hf(f: _Fields, model_type: str) -> TextConfig:
    """The decoder's fields of `f` (a 5.x text_config, or the root of a 4.x, qwen2, qwen3 or llama config.json), read
    as `model_type`'s config says them (`_DECODERS`)."""
    decoder = _DECODERS[model_type]
    if f.flag("use_sliding_window", False):
        raise f.error("use_sliding_window", "true is not supported (jaxvlm attends over the whole sequence)")
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    if decoder.num_key_value_heads is None or f.d.get("num_key_value_heads", 0) is None:
        kv_heads = f.optional_integer("num_key_value_heads", minimum=1) or heads  # null: one per head (transformers)
    else:
        kv_heads = f.integer("num_key_value_heads", decoder.num_key_value_heads)
    if decoder.head_dim is None:
        head_dim = f.optional_integer("head_dim", minimum=1)  # null: hidden_size // num_attention_heads
    else:
        head_dim = f.integer("head_dim", decoder.head_dim)
    if head_dim is None and hidden % heads:
        raise f.error(
            "hidden_size",
            f"{hidden} is not divisible by {f.name('num_attention_heads')}={heads} (and no head_dim is given)",
        )
    if heads % kv_heads:
        raise f.error("num_key_value_heads", f"{kv_heads} does not divide {f.name('num_attention_heads')}={heads}")
    resolved = head_dim or hidden // heads
    if head_dim:
        default = "" if "head_dim" in f.d else f", {model_type}'s default"
        head_dim_text = f"{f.name('head_dim')} = {head_dim}{default}"
    else:
        head_dim_text = f"{f.name('hidden_size')} / {f.name('num_attention_heads')} = {hidden} / {heads} = {resolved}"
    if resolved % 2:
        raise f.error(
            "head_dim" if head_dim else "hidden_size", f"the head dimension ({head_dim_text}) must be even for RoPE"
        )
    theta, section, section_field, rope_scaling = _rope(f, decoder)
    if section is not None and not decoder.multimodal:
        raise CheckpointError(
            f"{f.file}: {section_field}: model_type {model_type} has no multimodal RoPE (1-D positions only)"
        )
    if section is None and decoder.mrope_section is not None:
        section = decoder.mrope_section  # transformers' default for the model type when the config names none
        if sum(section) != resolved // 2:
            raise CheckpointError(
                f"{f.file}: {section_field}: missing, and the default {list(section)} sums to {sum(section)}, not to "
                f"half the head dimension ({head_dim_text})"
            )
    if section is not None and sum(section) != resolved // 2:
        raise CheckpointError(
            f"{f.file}: {section_field}: {list(section)} sums to {sum(section)}, but must sum to half the head "
            f"dimension ({head_dim_text}), {resolved // 2}"
        )
    attention_bias = f.flag("attention_bias", False) if decoder.attention_bias else None
    return TextConfig(
        vocab_size=f.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size"),
        num_hidden_layers=f.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or 0,
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        rope_theta=theta,
        mrope_section=section,
        max_position_embeddings=f.integer("max_position_embeddings", decoder.max_position_embeddings),
        hidden_act=f.choice("hidden_act", "silu", SUPPORTED_ACTIVATIONS),
        qkv_bias=True if attention_bias is None else attention_bias,  # None: Qwen2's q/k/v biases
        o_bias=bool(attention_bias),
        mlp_bias=f.flag("mlp_bias", False) if decoder.mlp_bias else False,
        rope_scaling=rope_scaling,
        qk_norm=decoder.qwen3,
        mrope_interleaved=decoder.qwen3 and section is not None,
        bos_token_id=f.token_ids("bos_token_id"),
        eos_token_id=f.token_ids("eos_token_id"),
        pad_token_id=f.token_ids("pad_token_id"),
    )


def _vision_fields(f: _Fields, defaults: VisionConfig | Qwen3VisionConfig, text: TextConfig, text_fields: _Fields):
    """The fields both vision towers share, checked; absent fields take `defaults`' values (transformers' defaults).
    Returns them as ModelConfig keyword arguments."""
    hidden, heads = f.integer("hidden_size", defaults.hidden_size), f.integer("num_heads", defaults.num_heads)
    if hidden % heads or (hidden // heads) % 4:
        raise f.error(
            "hidden_size", f"{hidden} / {f.name('num_heads')}={heads} must give a head dimension divisible by 4"
        )
    out_hidden = f.integer("out_hidden_size", defaults.out_hidden_size)
    if out_hidden != text.hidden_size:
        raise f.error(
            "out_hidden_size",
            f"{out_hidden} must equal {text_fields.name('hidden_size')}={text.hidden_size} (the merger projects into "
            "the text embedding)",
        )
    rope = f.section("rope_parameters")
    rope_type = rope.optional_string("rope_type") if rope is not None else None
    if rope_type not in (None, "axial", "default"):  # transformers reads "default" as "axial", refuses the others
        raise rope.error("rope_type", f"{_json_text(rope_type)} is not supported (supported: axial, default)")
    channels_key = "in_channels" if "in_channels" in f.d else "in_chans"  # in_chans: older hub configs
    return dict(
        depth=f.integer("depth", defaults.depth),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size", defaults.intermediate_size),
        num_heads=heads,
        in_channels=f.integer(channels_key, defaults.in_channels),
        patch_size=f.integer("patch_size", defaults.patch_size),
        temporal_patch_size=f.integer("temporal_patch_size", defaults.temporal_patch_size),
        spatial_merge_size=f.integer("spatial_merge_size", defaults.spatial_merge_size),
        out_hidden_size=out_hidden,
        rope_theta=rope.number("rope_theta", defaults.rope_theta) if rope is not None else defaults.rope_theta,
        hidden_act=f.choice("hidden_act", defaults.hidden_act, SUPPORTED_ACTIVATIONS),
    )


def _vision_from_hf(f: _Fields, text: TextConfig, text_fields: _Fields) -> VisionConfig:
    """The Qwen2.5-VL vision tower's fields of `f` (vision_config); absent fields take Qwen2.5-VL-3B's values."""
    defaults = VisionConfig()
    shared = _vision_fields(f, defaults, text, text_fields)
    depth, patch, merge = shared["depth"], shared["patch_size"], shared["spatial_merge_size"]
    window, unit = f.integer("window_size", defaults.window_size), patch * merge
    if window % unit:
        raise f.error(
            "window_size",
            f"{window} is not a multiple of {f.name('patch_size')} * {f.name('spatial_merge_size')} = "
            f"{patch} * {merge} = {unit}",
        )
    window_patches = (window // unit * merge) ** 2
    if window_patches > MAX_WINDOW_PATCHES:
        raise f.error(
            "window_size", f"{window} gives windows of {window_patches} patches (at most {MAX_WINDOW_PATCHES})"
        )
    fullatt = f.integers("fullatt_block_indexes", list(defaults.fullatt_block_indexes))
    for i, index in enumerate(fullatt):
        if index >= depth:
            raise f.error(f"fullatt_block_indexes[{i}]", f"{index} is out of range for {f.name('depth')}={depth}")
    return VisionConfig(
        **shared,
        window_size=window,
        fullatt_block_indexes=fullatt,
        tokens_per_second=f.integer("tokens_per_second", defaults.tokens_per_second),
    )


def _qwen3_vision_from_hf(f: _Fields, text: TextConfig, text_fields: _Fields) -> Qwen3VisionConfig:
    """The Qwen3-VL vision tower's fields of `f` (vision_config); absent fields take transformers' defaults
    (Qwen3VLVisionConfig's, which are `Qwen3VisionConfig`'s)."""
    defaults = Qwen3VisionConfig()
    shared = _vision_fields(f, defaults, text, text_fields)
    depth, merge = shared["depth"], shared["spatial_merge_size"]
    if merge**2 > MAX_WINDOW_PATCHES:  # the tower's slots are merge units (Qwen3VisionConfig.window_patches)
        raise f.error(
            "spatial_merge_size", f"{merge} gives merge units of {merge**2} patches (at most {MAX_WINDOW_PATCHES})"
        )
    positions = f.integer("num_position_embeddings", defaults.num_position_embeddings)
    if math.isqrt(positions) ** 2 != positions:
        raise f.error(
            "num_position_embeddings", f"{positions} is not a square (the table is a square grid of positions)"
        )
    indexes = f.integers("deepstack_visual_indexes", list(defaults.deepstack_visual_indexes))
    for i, index in enumerate(indexes):
        if index >= depth:
            raise f.error(f"deepstack_visual_indexes[{i}]", f"{index} is out of range for {f.name('depth')}={depth}")
        # transformers adds the features in block order, each through the merger at its index's position: the two
        # orders agree only for increasing indexes (and a repeated index leaves a merger without a feature).
        if i and index <= indexes[i - 1]:
            raise f.error(
                f"deepstack_visual_indexes[{i}]",
                f"{index} does not follow {indexes[i - 1]}: the indexes must be strictly increasing",
            )
    if len(indexes) > text.num_hidden_layers:
        raise f.error(
            "deepstack_visual_indexes",
            f"{len(indexes)} DeepStack features, but {text_fields.name('num_hidden_layers')}="
            f"{text.num_hidden_layers} decoder layers to add them to",
        )
    return Qwen3VisionConfig(**shared, num_position_embeddings=positions, deepstack_visual_indexes=indexes)


def from_hf_dict(d: Any, where: str = "config.json", **overrides) -> ModelConfig:
    """Build a ModelConfig from a parsed HF config.json (nested 5.x or flat 4.x form).

    Every field jaxvlm reads is checked for its type and range (see `_Fields`), and the fields against each other
    (heads divide the width, the M-RoPE section fits the head, the vision windows fit the patches); a bad one raises
    CheckpointError naming `where` and the field's path. Fields jaxvlm does not read are ignored."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: must be a JSON object, got {_json_text(d)}")
    root = _Fields(d, where)
    model_type = d.get("model_type")
    if model_type in TEXT_ONLY_MODEL_TYPES:
        return ModelConfig(
            text=_text_from_hf(root, model_type),
            vision=None,
            model_type=model_type,
            tie_word_embeddings=root.flag("tie_word_embeddings", False),
            **overrides,
        )
    if model_type not in ("qwen2_5_vl", "qwen3_vl"):
        raise CheckpointError(
            f"{where}: model_type: {_json_text(model_type)} is not supported (jaxvlm loads "
            + ", ".join(f'"{m}"' for m in SUPPORTED_MODEL_TYPES)
            + " checkpoints)"
        )
    qwen3 = model_type == "qwen3_vl"  # transformers 5 only: the text fields are always in text_config
    text_section = root.section("text_config", required=qwen3)
    nested = text_section is not None and (qwen3 or any(k in text_section.d for k in _TEXT_REQUIRED))
    text_fields = text_section if nested else root
    text = _text_from_hf(text_fields, model_type)
    vision_from_hf = _qwen3_vision_from_hf if qwen3 else _vision_from_hf
    vision = vision_from_hf(root.section("vision_config", required=True), text, text_fields)
    # Qwen3VLForConditionalGeneration ties by the root's flag alone (default false); Qwen2.5-VL reads either.
    tie = root.flag("tie_word_embeddings", False)
    if text_section is not None and not qwen3:
        tie = text_section.flag("tie_word_embeddings", False) or tie
    return ModelConfig(
        text=text,
        vision=vision,
        model_type=model_type,
        tie_word_embeddings=tie,
        **{k: root.integer(k, minimum=0) for k in TOKEN_ID_FIELDS if k in d},
        **overrides,
    )


def load_hf_config(path: str, **overrides) -> ModelConfig:
    """Read `<path>/config.json` (or a config.json file path); CheckpointError naming the file (and the field) when
    it is not UTF-8 JSON or a field is missing, mistyped or out of range."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(file, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except RecursionError as e:
        raise CheckpointError(f"{file}: invalid JSON: nested too deeply") from e
    return from_hf_dict(d, where=file, **overrides)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers 5.x writes for this model (loadable by `from_pretrained`)."""
    t = cfg.text
    hf_dtype = cfg.param_dtype
    text = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "use_sliding_window": False,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if t.head_dim:
        text["head_dim"] = t.head_dim
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.mrope_section is not None:
        rope["mrope_section"] = list(t.mrope_section)
    if t.rope_scaling is not None:
        rope.update(dataclasses.asdict(t.rope_scaling))
        if t.rope_scaling.rope_type == "linear":
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                del rope[name]
    if t.mrope_interleaved:
        rope["mrope_interleaved"] = True
    if cfg.model_type == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "dtype": hf_dtype,
            **{k: v for k, v in text.items() if k != "use_sliding_window"},
            "attention_bias": t.qkv_bias,
            "mlp_bias": t.mlp_bias,
            "head_dim": t.resolved_head_dim,
            "rope_parameters": rope,
        }
    # Qwen3: head_dim always written (transformers' default is 128, not hidden_size // heads).
    qwen3_text = {**text, "head_dim": t.resolved_head_dim, "attention_bias": t.qkv_bias, "rope_parameters": rope}
    if cfg.model_type == "qwen3":
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": hf_dtype, **qwen3_text}
    if cfg.model_type == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "dtype": hf_dtype,
            **text,
            "rope_parameters": rope,
        }
    v = cfg.vision
    vision = {
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "out_hidden_size": v.out_hidden_size,
        "hidden_act": v.hidden_act,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    tokens = {
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if cfg.model_type == "qwen3_vl":
        # Qwen3VLTextConfig has no sliding window, Qwen3VLForConditionalGeneration reads the root's tie flag only, and
        # bos / eos are no Qwen3VLTextConfig fields: written where set, as in the published config.json files.
        text_config = {
            k: value for k, value in qwen3_text.items() if k not in ("use_sliding_window", "tie_word_embeddings")
        }
        for key in ("bos_token_id", "eos_token_id"):
            if text_config[key] is None:
                del text_config[key]
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "dtype": hf_dtype,
            **tokens,
            "text_config": {"model_type": "qwen3_vl_text", **text_config},
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                **vision,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            },
        }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": hf_dtype,
        **tokens,
        "text_config": {"model_type": "qwen2_5_vl_text", **text, "rope_parameters": rope},
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            **vision,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
        },
    }


# ----------------------------------------------------------------------------------------------------------
# Named sizes (random init): used by configs, tests and benchmarks.
# ----------------------------------------------------------------------------------------------------------

PRESETS: dict[str, ModelConfig] = {
    # Qwen2.5-VL-3B-Instruct shapes (its config.json).
    "qwen2_5_vl_3b": ModelConfig(),
    # A tiny model for CPU demos and tests: 2 vision blocks, 2 decoder layers.
    "tiny": ModelConfig(
        text=TextConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(2, 3, 3),
            max_position_embeddings=4096,
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=(1,),
            out_hidden_size=64,
        ),
        image_token_id=1000,
        video_token_id=1001,
        vision_start_token_id=1002,
        vision_end_token_id=1003,
    ),
    # ~110M parameters (85M decoder + embeddings, 17M vision): the benchmarks' "100M" size (configs/bench.py).
    "100m": ModelConfig(
        text=TextConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            rope_theta=1000000.0,
            mrope_section=(8, 12, 12),
            max_position_embeddings=32768,
        ),
        vision=VisionConfig(
            depth=8,
            hidden_size=384,
            intermediate_size=1024,
            num_heads=6,
            window_size=112,
            fullatt_block_indexes=(3, 7),
            out_hidden_size=768,
        ),
        image_token_id=31655,
        video_token_id=31656,
        vision_start_token_id=31652,
        vision_end_token_id=31653,
    ),
    # Qwen2.5-0.5B's decoder (hidden 896, 24 layers, 14/2 heads, vocab 151936) behind the Qwen2.5-VL family's vision
    # tower (the same 32-block ViT as 3B/7B, projecting to 896): ~0.49B + 0.67B parameters. No official checkpoint
    # has these shapes; it is the family's smallest sensible member, for benchmarks.
    "qwen2_5_vl_0_5b": ModelConfig(
        text=TextConfig(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            mrope_section=(8, 12, 12),
            max_position_embeddings=32768,
        ),
        vision=VisionConfig(out_hidden_size=896),
    ),
    # ~30M parameters: big enough that matmuls dominate a CPU step, small enough to benchmark on a laptop.
    "small": ModelConfig(
        text=TextConfig(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            mrope_section=(16, 8, 8),
            max_position_embeddings=8192,
        ),
        vision=VisionConfig(
            depth=4,
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=(3,),
            out_hidden_size=512,
        ),
        image_token_id=8000,
        video_token_id=8001,
        vision_start_token_id=8002,
        vision_end_token_id=8003,
    ),
}


def _qwen3_vl_text(**fields) -> TextConfig:
    """The Qwen3-VL decoder: Qwen3 layers (q/k norms, no biases), interleaved M-RoPE, theta 5e6."""
    defaults = dict(
        vocab_size=151936,
        head_dim=128,
        rope_theta=5000000.0,
        mrope_section=(24, 20, 20),
        mrope_interleaved=True,
        max_position_embeddings=262144,
        qkv_bias=False,
        qk_norm=True,
    )
    return TextConfig(**{**defaults, **fields})


PRESETS.update(
    {
        # Qwen3-VL-2B-Instruct / -Thinking shapes (their config.json): 28 layers of width 2048, tied embeddings, the
        # 24-block ViT of width 1024 with DeepStack features from blocks 5, 11 and 17.
        "qwen3_vl_2b": ModelConfig(
            text=_qwen3_vl_text(
                hidden_size=2048,
                intermediate_size=6144,
                num_hidden_layers=28,
                num_attention_heads=16,
                num_key_value_heads=8,
            ),
            vision=Qwen3VisionConfig(
                depth=24,
                hidden_size=1024,
                intermediate_size=4096,
                num_heads=16,
                out_hidden_size=2048,
                deepstack_visual_indexes=(5, 11, 17),
            ),
            model_type="qwen3_vl",
            tie_word_embeddings=True,
        ),
        # Qwen3-VL-4B-Instruct / -Thinking: 36 layers of width 2560, tied embeddings, the 2B's ViT projecting to 2560.
        "qwen3_vl_4b": ModelConfig(
            text=_qwen3_vl_text(
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
            ),
            vision=Qwen3VisionConfig(
                depth=24,
                hidden_size=1024,
                intermediate_size=4096,
                num_heads=16,
                out_hidden_size=2560,
                deepstack_visual_indexes=(5, 11, 17),
            ),
            model_type="qwen3_vl",
            tie_word_embeddings=True,
        ),
        # A tiny Qwen3-VL for CPU demos and tests (the `tiny` preset's sizes): 3 vision blocks (DeepStack from blocks
        # 0 and 1), 3 decoder layers, an 8 x 8 position-embedding table.
        "qwen3_vl_tiny": ModelConfig(
            text=_qwen3_vl_text(
                vocab_size=1024,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                rope_theta=10000.0,
                mrope_section=(2, 3, 3),
                max_position_embeddings=4096,
            ),
            vision=Qwen3VisionConfig(
                depth=3,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                num_position_embeddings=64,
                deepstack_visual_indexes=(0, 1),
            ),
            model_type="qwen3_vl",
            tie_word_embeddings=True,
            image_token_id=1000,
            video_token_id=1001,
            vision_start_token_id=1002,
            vision_end_token_id=1003,
        ),
        # ~110M parameters, the `100m` preset's decoder and ViT widths in the Qwen3-VL architecture (benchmarks).
        "qwen3_vl_100m": ModelConfig(
            text=_qwen3_vl_text(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                head_dim=64,
                rope_theta=1000000.0,
                mrope_section=(12, 10, 10),
                max_position_embeddings=32768,
            ),
            vision=Qwen3VisionConfig(
                depth=8,
                hidden_size=384,
                intermediate_size=1536,
                num_heads=6,
                out_hidden_size=768,
                num_position_embeddings=576,
                deepstack_visual_indexes=(1, 3, 5),
            ),
            model_type="qwen3_vl",
            tie_word_embeddings=True,
            image_token_id=31655,
            video_token_id=31656,
            vision_start_token_id=31652,
            vision_end_token_id=31653,
        ),
    }
)


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
