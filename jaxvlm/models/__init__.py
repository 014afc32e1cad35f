"""Qwen2.5-VL, Qwen2 and Llama-family (SmolLM2, Llama 3.x) models: config, linen module, HF checkpoint I/O."""

from jaxvlm.models.checkpoint import CheckpointError, CheckpointMismatchError, load_pretrained, save_pretrained
from jaxvlm.models.config import ModelConfig, RopeScaling, TextConfig, VisionConfig, load_hf_config, preset
from jaxvlm.models.qwen2_5_vl import Qwen25VL, abstract_params, init_params

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ModelConfig",
    "Qwen25VL",
    "RopeScaling",
    "TextConfig",
    "VisionConfig",
    "abstract_params",
    "init_params",
    "load_hf_config",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
