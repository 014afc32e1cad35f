"""Host-side processing (numpy): images, vision metadata, M-RoPE positions, tokenizer + images -> model batch.

Nothing here imports torch; the math equals transformers' Qwen2VLImageProcessor (also Qwen3-VL's, with its
settings), `get_vision_window_index` and `Qwen2_5_VLModel.get_rope_index` / `Qwen3VLModel.get_rope_index`, and the
tests check it against them.
"""

from jaxvlm.processing.image import ImageProcessor, image_processor_for_model, smart_resize
from jaxvlm.processing.processor import Processor
from jaxvlm.processing.rope import get_rope_index, text_position_ids
from jaxvlm.processing.vision import VISION_INPUT_KEYS, layout_images, vision_layout, vision_window_index

__all__ = [
    "VISION_INPUT_KEYS",
    "ImageProcessor",
    "Processor",
    "get_rope_index",
    "image_processor_for_model",
    "smart_resize",
    "text_position_ids",
    "layout_images",
    "vision_layout",
    "vision_window_index",
]
