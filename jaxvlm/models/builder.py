"""One builder for every model family: the linen module of a `ModelConfig` (by its `model_type`), its random
parameters and their abstract shapes. The trainer, sampler, steps, evaluation, benchmarks and checkpoint I/O build
models only through here, so none of them branches on the family.

  model_type    module                    what it is
  qwen2_5_vl    qwen2_5_vl.Qwen25VL       Qwen2.5-VL
  qwen3_vl      qwen3_vl.Qwen3VL          Qwen3-VL (DeepStack vision tower, Qwen3 decoder)
  qwen2, qwen3  qwen2_5_vl.Qwen25VL       text-only Qwen2 / Qwen2.5 / Qwen3 (q/k norms from the config)
  llama         qwen2_5_vl.Qwen25VL       text-only Llama family (SmolLM2, Llama 3.x)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxvlm.models import lora
from jaxvlm.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxvlm.models.qwen2_5_vl import Qwen25VL, _init_inputs
from jaxvlm.models.qwen3_vl import Qwen3VL

MODEL_CLASSES: dict[str, type[Qwen25VL]] = {
    "qwen2_5_vl": Qwen25VL,
    "qwen3_vl": Qwen3VL,
    "qwen2": Qwen25VL,
    "qwen3": Qwen25VL,
    "llama": Qwen25VL,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_MODEL_TYPES), "every supported model_type needs a module"


def build_model(config: ModelConfig) -> nn.Module:
    """The linen module of `config` (see the table above)."""
    return MODEL_CLASSES[config.model_type](config)


def init_params(config: ModelConfig, rng: jax.Array | int = 0) -> dict:
    """Random parameters (normal(0.02) weights, zero biases, unit norms) as a nested dict; with `config.lora`, fresh
    adapters on the targeted layers too (`lora.add_adapters`, from a key folded off `rng`)."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    return jax.jit(functools.partial(_init, config))(rng)


def abstract_params(config: ModelConfig) -> dict:
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without allocating them."""
    return jax.eval_shape(functools.partial(_init, config), jax.random.key(0))


def _init(config: ModelConfig, rng: jax.Array) -> dict:
    base = build_model(config.replace(lora=None)).init(rng, **_init_inputs(config))["params"]
    if config.lora is None:
        return base
    return lora.add_adapters(base, config.lora, jax.random.fold_in(rng, ADAPTER_SEED))


# Folded into the init key for the adapters' A matrices (the base weights draw from the key itself).
ADAPTER_SEED = 0x10A
