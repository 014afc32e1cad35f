"""LoRA: low-rank adapters on a model's linear layers, as parameter-tree functions, and PEFT adapter I/O.

An adapted linear layer holds two more leaves next to its kernel, in the same nested dict:

  <layer>/kernel  [.., in, out]     the base weight (frozen)
  <layer>/lora_a  [.., in, r]       uniform(+-1/sqrt(in)) at the start (PEFT's kaiming_uniform(a=sqrt(5)))
  <layer>/lora_b  [.., r, out]      zero at the start, so the adapted model starts as the base model exactly

and the layer computes x W + b + (dropout(x) A) B * alpha / r (`qwen2_5_vl.Dense`, `GatedMLP`). Stacked layers
(`nn.scan`) carry the leading layer axis on the adapters too. The settings (`ModelConfig.lora`, a `LoraConfig`)
choose the layers by regexes over their paths.

A tree with adapters trains only them: `split_trainable` gives (adapters, base) and the training steps
differentiate and update the adapters alone (`jaxvlm.train_steps`), so the optimizer state and the gradients hold
adapter-sized leaves only. The base model is the same tree without the adapter leaves (`without_adapters`: the same
arrays, no copy), which is how the KL reference and the export see it.

PEFT: `save_peft_adapter` writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained`
loads onto the transformers model; `load_peft_adapter` reads such a directory into the tree.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvlm.models.config import LoraConfig, ModelConfig

ADAPTER_LEAVES = ("lora_a", "lora_b")
# Linear layers an adapter cannot go on: the LM head is read as a weight matrix by the vocabulary-chunked scorer
# (`train_steps.lm_head_logprobs`), and the patch embedding is a Conv3d in transformers (PEFT's adapter for it is a
# convolution, not this matmul's).
UNADAPTABLE = (r"^lm_head$", r"(^|/)patch_embed$")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class LoraError(ValueError):
    """Adapter settings that select nothing or an unadaptable layer, or a PEFT adapter that does not fit the model."""


def _flat(params) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(params)


def layer_path(path: tuple[str, ...]) -> str:
    return "/".join(path)


def is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES


def has_adapters(params) -> bool:
    return any(is_adapter(path) for path in _flat(params))


def linear_layers(params) -> list[tuple[str, ...]]:
    """Paths of every linear layer (a module holding a `kernel`), in tree order."""
    return [path[:-1] for path in _flat(params) if path[-1] == "kernel"]


def targeted_layers(params, lora: LoraConfig) -> list[tuple[str, ...]]:
    """The linear layers `lora.targets` select. LoraError when a pattern selects no linear layer, or selects one
    that cannot carry an adapter (`UNADAPTABLE`)."""
    layers = linear_layers(params)
    chosen = []
    for pattern in lora.targets:
        hits = [layer for layer in layers if re.search(pattern, layer_path(layer))]
        if not hits:
            raise LoraError(
                f"lora target {pattern!r} matches no linear layer of this model; layer paths look like "
                f"{', '.join(repr(layer_path(x)) for x in layers[:4])}"
            )
        for layer in hits:
            if any(re.search(bad, layer_path(layer)) for bad in UNADAPTABLE):
                raise LoraError(
                    f"lora target {pattern!r} selects {layer_path(layer)!r}, which cannot carry an adapter (the LM "
                    "head is read as a matrix by the chunked scorer; the patch embedding is a Conv3d in transformers)"
                )
            if layer not in chosen:
                chosen.append(layer)
    return [layer for layer in layers if layer in chosen]


def add_adapters(params, lora: LoraConfig, rng: jax.Array) -> dict:
    """`params` with a fresh adapter on every targeted layer (A uniform(+-1/sqrt(in)), B zero), in the kernel's
    dtype. Works under `jax.eval_shape` (abstract params in, abstract params out)."""
    if has_adapters(params):
        raise LoraError("these params already hold adapters")
    flat = dict(_flat(params))
    for i, layer in enumerate(targeted_layers(params, lora)):
        kernel = flat[(*layer, "kernel")]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / np.sqrt(fan_in)
        key = jax.random.fold_in(rng, i)
        a = jax.random.uniform(key, (*lead, fan_in, lora.rank), jnp.float32, -bound, bound)
        flat[(*layer, "lora_a")] = a.astype(kernel.dtype)
        flat[(*layer, "lora_b")] = jnp.zeros((*lead, lora.rank, fan_out), kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def split_trainable(params) -> tuple[dict, dict]:
    """(trainable, frozen): a tree with adapters trains them alone, (adapters, base); one without trains everything,
    (params, {})."""
    flat = _flat(params)
    if not any(is_adapter(path) for path in flat):
        return params, {}
    adapters = {path: v for path, v in flat.items() if is_adapter(path)}
    base = {path: v for path, v in flat.items() if not is_adapter(path)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def join(trainable, frozen) -> dict:
    """The inverse of `split_trainable`."""
    if not frozen:
        return trainable
    return traverse_util.unflatten_dict({**_flat(frozen), **_flat(trainable)})


def adapters_of(params) -> dict:
    """The adapter leaves alone (an empty dict for a tree without adapters)."""
    return traverse_util.unflatten_dict({path: v for path, v in _flat(params).items() if is_adapter(path)})


def without_adapters(params) -> dict:
    """The base model: the same arrays, the adapter leaves dropped."""
    return traverse_util.unflatten_dict({path: v for path, v in _flat(params).items() if not is_adapter(path)})


def merged(params, lora: LoraConfig) -> dict:
    """The base model with every adapter folded into its kernel, W + A B * alpha / r (in float32, stored in the
    kernel's dtype); no adapter leaves left. Host (numpy) params are merged on the host, device arrays on device."""
    every = _flat(params)
    flat = dict(_flat(without_adapters(params)))
    for path, a in every.items():
        if path[-1] != "lora_a":
            continue
        layer = path[:-1]
        b, kernel = every[(*layer, "lora_b")], flat[(*layer, "kernel")]
        xp = np if isinstance(kernel, np.ndarray) else jnp
        delta = xp.einsum("...ir,...ro->...io", a.astype(np.float32), b.astype(np.float32)) * np.float32(lora.scale)
        flat[(*layer, "kernel")] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def adapters_are_zero(params) -> bool:
    """Every adapter's B is zero (fresh adapters: the adapted model is the base model)."""
    b = [v for path, v in _flat(params).items() if path[-1] == "lora_b"]
    return bool(jax.jit(lambda bs: jnp.all(jnp.stack([jnp.all(x == 0) for x in bs])))(b)) if b else True


def num_adapter_params(params) -> int:
    return sum(int(np.prod(v.shape)) for path, v in _flat(params).items() if is_adapter(path))


# ----------------------------------------------------------------------------------------------------------
# PEFT adapter directories
# ----------------------------------------------------------------------------------------------------------


def peft_module_names(layer: tuple[str, ...], cfg: ModelConfig) -> list[str]:
    """The transformers module name(s) of one of our linear layers (one per layer of a stack), as PEFT names them:
    the in-memory names (`model.language_model.layers.0.self_attn.q_proj` for Qwen2.5-VL and Qwen3-VL)."""
    from jaxvlm.models import checkpoint as ckpt  # checkpoint -> builder -> lora: imported where used

    names = ckpt.hf_names((*layer, "kernel"), cfg)
    return [_in_memory_name(name.removesuffix(".weight"), cfg.model_type) for name in names]


def _in_memory_name(name: str, model_type: str) -> str:
    """transformers 5's module name from the on-disk name `save_pretrained` writes (they differ for Qwen2.5-VL)."""
    if model_type == "qwen2_5_vl":
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
    return name


def save_peft_adapter(cfg: ModelConfig, params, path: str, base_model: str = "") -> None:
    """Write a PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`) of the adapters in
    `params`, loadable by `peft.PeftModel.from_pretrained(<transformers model of cfg>, path)`."""
    lora = cfg.lora
    if lora is None or not has_adapters(params):
        raise LoraError("save_peft_adapter needs a model config with lora settings and params holding adapters")
    from jaxvlm.models import checkpoint as ckpt

    os.makedirs(path, exist_ok=True)
    flat = _flat(jax.device_get(adapters_of(params)))
    tensors, modules = {}, []
    for path_ in sorted(flat):
        layer, leaf = path_[:-1], path_[-1]
        names = peft_module_names(layer, cfg)
        value = np.asarray(flat[path_], np.float32)
        values = list(value) if len(names) > 1 or value.ndim == 3 else [value]
        if len(values) != len(names):
            raise LoraError(f"{layer_path(path_)}: {len(values)} stacked adapters for {len(names)} layers")
        for name, v in zip(names, values):
            tensors[f"base_model.model.{name}.{'lora_A' if leaf == 'lora_a' else 'lora_B'}.weight"] = (
                np.ascontiguousarray(v.T)
            )
            if leaf == "lora_a":
                modules.append(name)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _module_regex(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    ckpt.save_safetensors(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _module_regex(module_names: list[str]) -> str:
    """A regex PEFT full-matches (`re.fullmatch`) against module names: exactly the adapted modules, with each
    stack's layer index generalised (every layer of a stack is adapted, or none)."""
    generalised = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) for name in module_names})
    return "(" + "|".join(generalised) + ")"


# The adapter_config.json fields whose other values this reader cannot honour, and the values it can.
_PEFT_FIXED = {
    "peft_type": ("LORA",),
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "use_rslora": (False, None),
    "use_dora": (False, None),
    "modules_to_save": (None, []),
}


def load_peft_adapter(path: str, cfg: ModelConfig, params) -> dict:
    """`params` (the base model, with or without adapters) with the adapters of the PEFT directory `path`.

    The directory's rank and alpha must equal `cfg.lora`'s, and its adapted modules the layers `cfg.lora.targets`
    select; LoraError names the file and field or tensor otherwise (a mis-shaped, missing or extra tensor
    included)."""
    from jaxvlm.models import checkpoint as ckpt

    lora = cfg.lora
    if lora is None:
        raise LoraError("load_peft_adapter needs a model config with lora settings")
    config_file, weights_file = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise LoraError(f"{file}: no such file (a PEFT adapter directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise LoraError(f"{config_file}: not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{config_file}: must hold a JSON object, got {type(config).__name__}")
    for field, allowed in _PEFT_FIXED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise LoraError(f"{config_file}: {field}={config.get(field)!r} is not supported (only {allowed[0]!r})")
    for field, ours in (("r", lora.rank), ("lora_alpha", lora.alpha)):
        if field not in config:
            raise LoraError(f"{config_file}: no {field!r} field")
        if config[field] != ours:
            key = "rank" if field == "r" else "alpha"
            raise LoraError(
                f"{config_file}: {field}={config[field]!r}, but config.model.lora.{key}={ours!r}: set it to the "
                "adapter's"
            )
    base = without_adapters(params)
    flat_base = _flat(base)
    expected: dict[str, tuple[tuple[str, ...], int, str]] = {}  # file key -> (our path, layer index, leaf)
    for layer in targeted_layers(base, lora):
        for i, name in enumerate(peft_module_names(layer, cfg)):
            for leaf, peft_leaf in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                expected[f"base_model.model.{name}.{peft_leaf}.weight"] = (layer, i, leaf)
    weights = ckpt.SafetensorsFile(weights_file)
    stored = {name.replace(".default.weight", ".weight"): name for name in weights.keys()}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        lines = [f"{weights_file} does not hold the adapters config.model.lora.targets select:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if extra:
            lines.append(f"  not selected ({len(extra)}): {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
        raise LoraError("\n".join(lines))
    parts: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for key, (layer, i, leaf) in expected.items():
        kernel = flat_base[(*layer, "kernel")]
        fan_in, fan_out = kernel.shape[-2:]
        want = (lora.rank, fan_in) if leaf == "lora_a" else (fan_out, lora.rank)
        got = weights.shape(stored[key])
        if tuple(got) != want:
            raise LoraError(f"{weights_file}: {key} has shape {list(got)}, the model needs {list(want)}")
        parts.setdefault((*layer, leaf), {})[i] = np.asarray(weights.get(stored[key]), np.float32).T
    flat = dict(flat_base)
    for path_, by_layer in parts.items():
        kernel = flat_base[(*path_[:-1], "kernel")]
        stacked = kernel.ndim == 3
        value = np.stack([by_layer[i] for i in range(len(by_layer))]) if stacked else by_layer[0]
        flat[path_] = jnp.asarray(value, kernel.dtype)
    return traverse_util.unflatten_dict(flat)
