"""A smoke check of a model: one jitted forward pass on a synthetic batch with images, no training.

    python -m jaxvlm.bench.forward --config configs/forward.py --workdir /tmp/jaxvlm-forward \\
        [--config.model.preset='' --config.model.path=DIR]

Builds the model (random weights of `model.preset`, or a Hugging Face checkpoint directory), left-pads a small
synthetic batch with 0, 1 and 2 images per row, compiles and runs the forward pass and writes `forward.json`
(parameter count, shapes, compile and forward time, whether the logits are finite). Useful to check that a
checkpoint loads and runs on a machine before training on it.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg  # no variants yet
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a name from jaxvlm.models.config.PRESETS (random weights; "" to give a `path`)
    c.model.path = ""  # a local Hugging Face checkpoint directory (Qwen2.5-VL or Qwen2 / Qwen2.5)
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # storage dtype (fp32 master weights)
    c.model.remat = "none"  # none | full | attention | dots
    c.model.attention = "auto"  # auto | xla | cudnn | splash
    c.model.logits_chunk = 512
    c.model.vocab_chunk = 32768
    c.demo = ml_collections.ConfigDict()
    c.demo.batch_size = 3  # samples with 0, 1, 2, 0, 1, ... images, left-padded into one batch
    c.demo.image_sizes = ((56, 84), (70, 45))  # (height, width) of the synthetic images, cycled
    c.demo.text_tokens = 12  # random text tokens around the images
    c.demo.max_pixels = 28 * 28 * 64
    return c
