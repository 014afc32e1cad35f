"""jaxvlm: post-training small vision-language models (Qwen2.5-VL family) in JAX/Flax."""

__version__ = "0.1.0"
