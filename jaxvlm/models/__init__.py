"""Qwen2.5-VL, Qwen3-VL, Qwen2 / Qwen3 and Llama-family (SmolLM2, Llama 3.x) models: config, linen modules, one
builder by model_type, HF checkpoint I/O."""

from jaxvlm.models.builder import abstract_params, build_model, init_params
from jaxvlm.models.checkpoint import CheckpointError, CheckpointMismatchError, load_pretrained, save_pretrained
from jaxvlm.models.config import (
    ModelConfig,
    Qwen3VisionConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
    load_hf_config,
    preset,
)
from jaxvlm.models.qwen2_5_vl import Qwen25VL
from jaxvlm.models.qwen3_vl import Qwen3VL

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ModelConfig",
    "Qwen25VL",
    "Qwen3VL",
    "Qwen3VisionConfig",
    "RopeScaling",
    "TextConfig",
    "VisionConfig",
    "abstract_params",
    "build_model",
    "init_params",
    "load_hf_config",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
