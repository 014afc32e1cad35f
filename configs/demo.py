"""The built-in demo: a tiny Qwen2.5-VL-shaped model on the CPU, no downloads.

    python -m jaxvlm.main --config configs/demo.py --workdir /tmp/jaxvlm-demo

For now the demo builds the model (random weights, or `--config.model.path=DIR` for a Hugging Face checkpoint
directory), processes a small synthetic batch with images and runs the jitted forward pass. Training arrives with
the training-loop issue.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg  # no variants yet
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a name from jaxvlm.models.config.PRESETS, used when `path` is empty
    c.model.path = ""  # a local Hugging Face checkpoint directory (Qwen2.5-VL or Qwen2 / Qwen2.5)
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # storage dtype (fp32 master weights)
    c.model.remat = "none"  # none | full | dots
    c.demo = ml_collections.ConfigDict()
    c.demo.batch_size = 3  # samples with 0, 1, 2, 0, 1, ... images, left-padded into one batch
    c.demo.image_sizes = ((56, 84), (70, 45))  # (height, width) of the synthetic images, cycled
    c.demo.text_tokens = 12  # random text tokens around the images
    c.demo.max_pixels = 28 * 28 * 64
    return c
