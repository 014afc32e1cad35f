"""Model configuration for the Qwen2.5-VL family (and text-only Qwen2 / Qwen2.5).

`ModelConfig` is a frozen dataclass so a linen module can hold it as an attribute. It is read from and written
to a Hugging Face `config.json`; both layouts found in the wild are accepted:

* transformers 5.x: text fields nested under `text_config`, RoPE under `rope_parameters`;
* older hub checkpoints (transformers 4.4x): text fields at the root, `rope_theta` + `rope_scaling`
  (`{"type": "mrope", "mrope_section": [...]}`), `vision_config` nested;
* text-only `qwen2` checkpoints (Qwen2 / Qwen2.5 LMs): flat, 1-D RoPE.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2")
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
class TextConfig:
    """Qwen2 decoder: GQA with q/k/v bias, RMSNorm, SwiGLU, (M-)RoPE."""

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
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the model; `dtype` is the compute dtype, `param_dtype` the storage dtype.

    `dtype` and `param_dtype` take a name ("bfloat16"), an alias ("bf16") or a numpy / JAX dtype (jnp.bfloat16,
    np.float32, jnp.dtype("bfloat16")); the config holds the canonical name (one of `DTYPES`), so configs built
    from either form compare and hash equal.
    """

    text: TextConfig = TextConfig()
    vision: VisionConfig | None = VisionConfig()
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
    layer = t.hidden_size * (q + 2 * kv) + (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    text = t.num_hidden_layers * (layer + 2 * t.hidden_size) + t.hidden_size + t.vocab_size * t.hidden_size
    text += 0 if cfg.tie_word_embeddings else t.vocab_size * t.hidden_size
    if v is None:
        return text
    h, i, width = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    block = 3 * h * h + 3 * h + h * h + h + 3 * h * i + 2 * i + h + 2 * h
    merger = h + width * width + width + width * v.out_hidden_size + v.out_hidden_size
    return text + v.patch_dim * h + v.depth * block + merger


def default_remat(cfg: ModelConfig) -> str:
    """remat="auto": "none" below 0.5B parameters (activations of small models fit, and recomputing costs a third
    more FLOPs), "full" from there (what a 3B run on one accelerator needs; see BENCHMARKS.md's memory table)."""
    return "none" if num_params(cfg) < 500_000_000 else "full"


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
    if cfg.model_type == "qwen2" and v is not None:
        raise ValueError("model_type='qwen2' is text-only: vision must be None")
    if cfg.model_type == "qwen2_5_vl" and v is None:
        raise ValueError("model_type='qwen2_5_vl' needs a vision config")
    if v is not None:
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


def _rope(d: dict[str, Any], where: str) -> tuple[float, tuple[int, ...] | None]:
    """(rope_theta, mrope_section) from either `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 1000000.0))
    rope_type = params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "mrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only default / mrope)")
    section = params.get("mrope_section", scaling.get("mrope_section"))
    return float(theta), (tuple(int(s) for s in section) if section is not None else None)


def _eos(value):
    return tuple(value) if isinstance(value, list) else value


def _text_from_hf(d: dict[str, Any], where: str, default_mrope: bool) -> TextConfig:
    if d.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    theta, section = _rope(d, where)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing text fields {missing}")
    heads = int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or 0)
    if default_mrope and section is None:
        section = (16, 24, 24)  # transformers' default for qwen2_5_vl when the config names none
    return TextConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=section,
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=_eos(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )


def _vision_from_hf(d: dict[str, Any]) -> VisionConfig:
    theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    defaults = VisionConfig()
    return VisionConfig(
        depth=int(d.get("depth", defaults.depth)),
        hidden_size=int(d.get("hidden_size", defaults.hidden_size)),
        intermediate_size=int(d.get("intermediate_size", defaults.intermediate_size)),
        num_heads=int(d.get("num_heads", defaults.num_heads)),
        in_channels=int(d.get("in_channels", d.get("in_chans", defaults.in_channels))),
        patch_size=int(d.get("patch_size", defaults.patch_size)),
        temporal_patch_size=int(d.get("temporal_patch_size", defaults.temporal_patch_size)),
        spatial_merge_size=int(d.get("spatial_merge_size", defaults.spatial_merge_size)),
        window_size=int(d.get("window_size", defaults.window_size)),
        fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", defaults.fullatt_block_indexes)),
        out_hidden_size=int(d.get("out_hidden_size", defaults.out_hidden_size)),
        tokens_per_second=int(d.get("tokens_per_second", defaults.tokens_per_second)),
        rope_theta=float(theta),
        hidden_act=d.get("hidden_act", defaults.hidden_act),
    )


def from_hf_dict(d: dict[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
    """Build a ModelConfig from a parsed HF config.json (nested 5.x or flat 4.x form)."""
    model_type = d.get("model_type")
    if model_type == "qwen2":
        text = _text_from_hf(d, where, default_mrope=False)
        return ModelConfig(
            text=text,
            vision=None,
            model_type="qwen2",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            **overrides,
        )
    if model_type != "qwen2_5_vl":
        raise ValueError(
            f"{where}: model_type={model_type!r} is not supported; jaxvlm loads 'qwen2_5_vl' and 'qwen2' checkpoints"
        )
    text_d = d.get("text_config")
    nested = isinstance(text_d, dict) and "hidden_size" in text_d
    text = _text_from_hf(text_d if nested else d, where + (":text_config" if nested else ""), default_mrope=True)
    if "vision_config" not in d:
        raise ValueError(f"{where}: qwen2_5_vl config has no vision_config")
    tie = bool(d.get("tie_word_embeddings", False)) or bool((text_d or {}).get("tie_word_embeddings", False))
    ids = {
        k: int(d[k])
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        if k in d
    }
    return ModelConfig(
        text=text,
        vision=_vision_from_hf(d["vision_config"]),
        model_type="qwen2_5_vl",
        tie_word_embeddings=tie,
        **ids,
        **overrides,
    )


def load_hf_config(path: str, **overrides) -> ModelConfig:
    """Read `<path>/config.json` (or a config.json file path)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(file) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
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
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "out_hidden_size": v.out_hidden_size,
        "tokens_per_second": v.tokens_per_second,
        "hidden_act": v.hidden_act,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": hf_dtype,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": {"model_type": "qwen2_5_vl_text", **text, "rope_parameters": rope},
        "vision_config": vision,
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


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
