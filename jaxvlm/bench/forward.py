"""A smoke check of a model: one jitted forward pass on a synthetic batch with images, no training.

    python -m jaxvlm.bench.forward --config configs/forward.py --workdir /tmp/jaxvlm-forward \\
        [--config.model.preset='' --config.model.path=DIR]

Builds the model as a run does (`jaxvlm.runtime.build_model`: random weights of `model.preset`, or a Hugging Face
checkpoint directory), left-pads a small synthetic batch with 0, 1 and 2 images per row, compiles and runs the
forward pass and writes `forward.json` (parameter count, shapes, compile and forward time, whether the logits are
finite). Useful to check that a checkpoint loads and runs on a machine before training on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxvlm import cli, configuration, models, runtime
from jaxvlm.processing.image import ImageProcessor
from jaxvlm.processing.processor import pad_sequences
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.processing.vision import layout_images

_CONFIG = config_flags.DEFINE_config_file("config", "configs/forward.py", "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where forward.json is written.")


def synthetic_batch(model_cfg: models.ModelConfig, processor: ImageProcessor, demo, seed: int) -> dict:
    """A left-padded batch: sample i carries i % 3 random images between random text tokens, through `processor`
    (the model family's image processor: its patch size, resize factor and normalisation)."""
    rng = np.random.default_rng(seed)
    vocab = min(model_cfg.text.vocab_size, model_cfg.image_token_id)
    rows, images, k = [], [], 0
    for i in range(demo.batch_size):
        row = list(rng.integers(0, vocab, demo.text_tokens // 2))
        for _ in range(i % 3):
            h, w = demo.image_sizes[k % len(demo.image_sizes)]
            k += 1
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            n_tokens = processor.num_image_tokens(h, w)
            row += [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * n_tokens
            row += [model_cfg.vision_end_token_id]
            images.append(image)
        rows.append(row + list(rng.integers(0, vocab, demo.text_tokens - demo.text_tokens // 2)))
    input_ids, attention_mask = pad_sequences(rows, 0, padding_side="left", length=max(map(len, rows)))
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if images:
        pixels = processor(images)
        batch["pixel_values"], batch["vision_inputs"] = layout_images(
            pixels["pixel_values"], pixels["image_grid_thw"], model_cfg.vision
        )
        batch["position_ids"], _ = get_rope_index(
            input_ids,
            attention_mask,
            pixels["image_grid_thw"],
            image_token_id=model_cfg.image_token_id,
            spatial_merge_size=model_cfg.vision.spatial_merge_size,
        )
    return batch


def run_forward(cfg, workdir: str | None) -> dict:
    spec = configuration.resolve_model(cfg.model)
    model, params = runtime.build_model(spec, cfg.seed)
    if model.config.vision is None:
        raise ValueError(
            "the forward check's batch has images: use a vision-language model, Qwen2.5-VL or Qwen3-VL "
            "(config.model.path / preset)"
        )
    # The checkpoint's preprocessor_config.json, else the family's default processor; the demo's pixel bounds.
    bounds = dataclasses.replace(spec, min_pixels=min(56 * 56, cfg.demo.max_pixels), max_pixels=cfg.demo.max_pixels)
    processor = runtime.build_image_processor(bounds, model.config)
    batch = synthetic_batch(model.config, processor, cfg.demo, cfg.seed)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    t0 = time.perf_counter()
    compiled = forward.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = jax.block_until_ready(compiled(params, batch))
    step_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    valid = batch["attention_mask"].astype(bool)
    result = {
        "params": int(n_params),
        "batch": list(batch["input_ids"].shape),
        "image_patches": int(np.prod(batch["pixel_values"].shape[:2])) if "pixel_values" in batch else 0,
        "logits_shape": list(logits.shape),
        "logits_finite": bool(jnp.isfinite(logits[valid]).all()),
        "compile_s": round(compile_s, 3),
        "forward_s": round(step_s, 4),
        "backend": jax.default_backend(),
    }
    print(
        f"jaxvlm forward: {n_params / 1e6:.2f}M params, batch {result['batch']}, "
        f"{result['image_patches']} image patches -> logits {result['logits_shape']} "
        f"(compile {compile_s:.2f}s, forward {step_s * 1e3:.1f}ms on {result['backend']})"
    )
    if workdir and jax.process_index() == 0:  # one writer in multi-process runs
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "forward.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = run_forward(_CONFIG.value, _WORKDIR.value)
    if not result["logits_finite"]:
        raise SystemExit("non-finite logits")


if __name__ == "__main__":
    cli.run(main)
