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
    """`params` with a fresh adapter on every targeted layer (A uniform(+-1/sqrt(in)), B zero). Adapters are float32
    master weights whatever the base's dtype, so a bfloat16 base (`param_dtype="bfloat16"`: half the memory of the
    frozen weights) still trains its adapters in float32. Works under `jax.eval_shape`."""
    if has_adapters(params):
        raise LoraError("these params already hold adapters")
    flat = dict(_flat(params))
    for i, layer in enumerate(targeted_layers(params, lora)):
        kernel = flat[(*layer, "kernel")]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / np.sqrt(fan_in)
        key = jax.random.fold_in(rng, i)
        a = jax.random.uniform(key, (*lead, fan_in, lora.rank), jnp.float32, -bound, bound)
        flat[(*layer, "lora_a")] = a
        flat[(*layer, "lora_b")] = jnp.zeros((*lead, lora.rank, fan_out), jnp.float32)
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

#
# What peft (0.21, on transformers 5) writes and reads, and so what these functions do:
#
#   adapter_config.json        peft's LoraConfig fields. `target_modules` is a list (a module is adapted when its name
#                              equals an entry or ends with "." + entry) or a string: a regex `re.fullmatch`ed against
#                              every module name. We write a regex naming exactly the adapted modules.
#   adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r] (torch's
#                              [out, in] of x -> x A and of -> B), one pair per layer of a stack, without the adapter
#                              name (peft inserts ".default" on load and drops it on save). <module> is transformers 5's
#                              in-memory module name: "model.language_model.layers.0.self_attn.q_proj" and
#                              "model.visual.blocks.0.attn.qkv" for both VL families (Qwen2.5-VL's model files say
#                              "model.layers.*" / "visual.*", its modules do not), "model.layers.0.mlp.up_proj" for
#                              the text-only ones. peft applies no transformers weight conversion to these model types.


def peft_module_names(layer: tuple[str, ...], cfg: ModelConfig) -> list[str]:
    """The transformers module name(s) of one of our linear layers (one per layer of a stack), as PEFT names them:
    the in-memory names (`model.language_model.layers.0.self_attn.q_proj` for Qwen2.5-VL and Qwen3-VL)."""
    from jaxvlm.models import checkpoint as ckpt  # checkpoint -> builder -> lora: imported where used

    names = ckpt.hf_names((*layer, "kernel"), cfg)
    return [_in_memory_name(name.removesuffix(".weight"), cfg.model_type) for name in names]


def _in_memory_name(name: str, model_type: str) -> str:
    """transformers 5's module name from the on-disk name `save_pretrained` writes (they differ for Qwen2.5-VL); a
    name already in memory form is returned as it is."""
    if model_type == "qwen2_5_vl" and not name.startswith(("model.language_model.", "model.visual.")):
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
    return name


_PEFT_PREFIX = "base_model.model."
_PEFT_LEAF = {"lora_a": "lora_A", "lora_b": "lora_B"}
_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<leaf>lora_[AB])(\.default)?\.weight")


def _peft_key(module: str, leaf: str) -> str:
    return f"{_PEFT_PREFIX}{module}.{_PEFT_LEAF[leaf]}.weight"


def _canonical_peft_key(key: str, model_type: str) -> str:
    """A tensor name of an adapter file in the form `_peft_key` gives: without an adapter name (".default", as in a
    raw state dict), and for Qwen2.5-VL with the in-memory module name also where the file has the model files' names
    (adapters trained with transformers 4 before its 4.52 renaming). Other names come back unchanged."""
    match = _PEFT_KEY.fullmatch(key)
    if match is None:
        return key
    return f"{_PEFT_PREFIX}{_in_memory_name(match['module'], model_type)}.{match['leaf']}.weight"


def save_peft_adapter(cfg: ModelConfig, params, path: str, base_model: str = "") -> None:
    """Write a PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`, float32) of the
    adapters in `params`, loadable by `peft.PeftModel.from_pretrained(<transformers model of cfg>, path)`; every
    tensor of the file lands on its module, and `target_modules` wraps exactly the adapted modules."""
    lora = cfg.lora
    if lora is None or not has_adapters(params):
        raise LoraError("save_peft_adapter needs a model config with lora settings and params holding adapters")
    from jaxvlm.models import checkpoint as ckpt

    flat = _flat(jax.device_get(adapters_of(params)))
    tensors, stacks = {}, []
    for layer in sorted({path_[:-1] for path_ in flat}):
        a, b = flat.get((*layer, "lora_a")), flat.get((*layer, "lora_b"))
        if a is None or b is None:
            raise LoraError(f"{layer_path(layer)}: an adapter needs both lora_a and lora_b")
        if a.shape[-1] != lora.rank or b.shape[-2] != lora.rank:
            raise LoraError(
                f"{layer_path(layer)}: lora_a {list(a.shape)} / lora_b {list(b.shape)} are not of rank "
                f"config.model.lora.rank={lora.rank}"
            )
        names = peft_module_names(layer, cfg)
        stacked = a.ndim == 3
        pairs = list(zip(a, b)) if stacked else [(a, b)]
        if len(pairs) != len(names):
            raise LoraError(f"{layer_path(layer)}: {len(pairs)} stacked adapters for {len(names)} layers")
        for name, (a_i, b_i) in zip(names, pairs):
            tensors[_peft_key(name, "lora_a")] = np.ascontiguousarray(np.asarray(a_i, np.float32).T)
            tensors[_peft_key(name, "lora_b")] = np.ascontiguousarray(np.asarray(b_i, np.float32).T)
        stacks.append(names)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _module_regex(stacks),
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    os.makedirs(path, exist_ok=True)
    ckpt.save_safetensors(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _module_regex(stacks: list[list[str]]) -> str:
    """A regex that PEFT `re.fullmatch`es against module names and that matches exactly the adapted modules: one
    alternative per stack of layers (its names differ only in the layer index, written as \\d+: we adapt every layer
    of a stack or none), or per single layer."""
    alternatives = set()
    for names in stacks:
        parts = [name.split(".") for name in names]
        varying = {i for other in parts[1:] for i, (x, y) in enumerate(zip(parts[0], other)) if x != y}
        if len(varying) > 1 or any(len(other) != len(parts[0]) for other in parts):  # not one index: list them
            alternatives.update(re.escape(name) for name in names)
            continue
        alternatives.add(r"\.".join(r"\d+" if i in varying else re.escape(s) for i, s in enumerate(parts[0])))
    return "(" + "|".join(sorted(alternatives)) + ")"


# adapter_config.json fields with the values this reader honours (an absent field reads as the first): the adapter
# must compute y = x W + (x A) B * alpha / r on the unchanged base weights.
_PEFT_FIXED = {
    "peft_type": ("LORA",),
    "bias": ("none",),  # "all" / "lora_only" train (and save) the base model's biases too
    # pissa / olora / corda / loftq / lora_ga change the base weights at the start (an adapter saved without peft's
    # path_initial_model_for_weight_conversion applies to those, not to the base model); mica is a LoRA variant.
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
}
# Fields that must be off (absent, false, null or empty): each changes what the adapter computes, gives layers their
# own rank or alpha, or puts other tensors in the file.
_PEFT_OFF = (
    "use_dora",  # magnitude vectors: DoRA
    "use_rslora",  # scale alpha / sqrt(r)
    "fan_in_fan_out",  # GPT-2 Conv1D weights (transposed)
    "lora_bias",  # a bias on lora_B
    "use_qalora",  # pooled inputs
    "modules_to_save",  # whole modules trained and saved
    "trainable_token_indices",  # trained embedding rows
    "rank_pattern",  # per-module ranks
    "alpha_pattern",  # per-module alphas
    "layer_replication",  # a deeper model from repeated layers
    "target_parameters",  # adapters on bare parameters (MoE experts)
    "alora_invocation_tokens",  # activated LoRA: the adapter acts from an invocation sequence on
    "use_bdlora",  # block-diagonal factors
    "velora_config",  # LoRA variants
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "megatron_config",  # Megatron parallel layers
)


def _check_peft_config(config_file: str, lora: LoraConfig) -> None:
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise LoraError(f"{config_file}: not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{config_file}: must hold a JSON object, got {type(config).__name__}")
    for field, allowed in _PEFT_FIXED.items():
        value = config.get(field, allowed[0])
        if not any(type(value) is type(ok) and value == ok for ok in allowed):
            raise LoraError(f"{config_file}: {field}={value!r} is not supported (only {', '.join(map(repr, allowed))})")
    for field in _PEFT_OFF:
        if config.get(field):
            raise LoraError(f"{config_file}: {field}={config[field]!r} is not supported (only off / empty)")
    for field, ours, key in (("r", lora.rank, "rank"), ("lora_alpha", lora.alpha, "alpha")):
        if field not in config:
            raise LoraError(f"{config_file}: no {field!r} field")
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != ours:
            raise LoraError(
                f"{config_file}: {field}={value!r}, but config.model.lora.{key}={ours!r}: set it to the adapter's"
            )


def load_peft_adapter(path: str, cfg: ModelConfig, params) -> dict:
    """`params` (the base model, with or without adapters) with the adapters of the PEFT directory `path`, e.g. one
    peft's `save_pretrained` wrote, in the kernels' dtype.

    The directory's rank and alpha must equal `cfg.lora`'s, and its tensors must be exactly lora_A and lora_B of the
    layers `cfg.lora.targets` select (every layer of a stack); LoraError names the file and the field or tensor
    otherwise (a config field we cannot honour, a missing, extra or mis-shaped tensor), and when the file adapts other
    layers, the targets that would select them."""
    from jaxvlm.models import checkpoint as ckpt

    lora = cfg.lora
    if lora is None:
        raise LoraError("load_peft_adapter needs a model config with lora settings")
    config_file, weights_file = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise LoraError(f"{file}: no such file (a PEFT adapter directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    _check_peft_config(config_file, lora)
    base = without_adapters(params)
    flat_base = _flat(base)
    expected: dict[str, tuple[tuple[str, ...], int, str]] = {}  # file key -> (our layer, layer index, leaf)
    for layer in targeted_layers(base, lora):
        for i, name in enumerate(peft_module_names(layer, cfg)):
            for leaf in ADAPTER_LEAVES:
                expected[_peft_key(name, leaf)] = (layer, i, leaf)
    weights = ckpt.SafetensorsFile(weights_file)
    stored: dict[str, str] = {}  # canonical key -> the file's key
    for key in weights.keys():
        canonical = _canonical_peft_key(key, cfg.model_type)
        if canonical in stored:
            raise LoraError(f"{weights_file}: {stored[canonical]!r} and {key!r} are the same tensor")
        stored[canonical] = key
    missing = sorted(set(expected) - set(stored))
    extra = sorted(stored[key] for key in set(stored) - set(expected))
    if missing or extra:
        raise LoraError(_selection_error(weights_file, missing, extra, stored, base, cfg))
    parts: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for key, (layer, i, leaf) in expected.items():
        fan_in, fan_out = flat_base[(*layer, "kernel")].shape[-2:]
        want = (lora.rank, fan_in) if leaf == "lora_a" else (fan_out, lora.rank)
        name = stored[key]
        shape = list(weights.shape(name))
        if shape != list(want):
            raise LoraError(f"{weights_file}: {name} has shape {shape}, the model needs {list(want)}")
        if weights.dtype(name) not in ckpt.WEIGHT_DTYPES:
            raise LoraError(f"{weights_file}: {name} has dtype {weights.dtype(name)}, not a weight's")
        parts.setdefault((*layer, leaf), {})[i] = np.asarray(weights.get(name), np.float32).T
    flat = dict(flat_base)
    for path_, by_layer in parts.items():
        kernel = flat_base[(*path_[:-1], "kernel")]
        value = np.stack([by_layer[i] for i in range(len(by_layer))]) if kernel.ndim == 3 else by_layer[0]
        flat[path_] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _selection_error(weights_file: str, missing: list[str], extra: list[str], stored: dict, base, cfg) -> str:
    """The message for a file whose tensors are not lora_A / lora_B of exactly the selected layers, with the targets
    that select the file's layers when it adapts whole linear layers (stacks) of this model."""
    lines = [f"{weights_file} does not hold exactly the adapters config.model.lora.targets select:"]
    for what, keys in (("missing", missing), ("extra", extra)):
        if keys:
            lines.append(f"  {what} ({len(keys)}): {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else ""))
    modules = {
        name: (layer, i) for layer in linear_layers(base) for i, name in enumerate(peft_module_names(layer, cfg))
    }
    adapted: dict[tuple[str, ...], set[tuple[int, str]]] = {}
    for key in stored:
        match = _PEFT_KEY.fullmatch(key)
        if match is None or match["module"] not in modules:
            return "\n".join(lines)  # not an adapter of one of our linear layers: nothing more to say
        layer, i = modules[match["module"]]
        adapted.setdefault(layer, set()).add((i, match["leaf"]))
    for layer, have in adapted.items():
        n = len(peft_module_names(layer, cfg))
        whole = sorted(i for i in range(n) if {(i, "lora_A"), (i, "lora_B")} <= have)
        if len(have) != 2 * len(whole):  # a lora_A without its lora_B or the other way round: listed above
            return "\n".join(lines)
        if len(whole) != n:
            lines.append(
                f"  the file adapts layers {whole} of the stack {layer_path(layer)} only; jaxvlm adapts every layer of "
                "a stack or none"
            )
            return "\n".join(lines)
    unadaptable = [layer for layer in adapted if any(re.search(bad, layer_path(layer)) for bad in UNADAPTABLE)]
    if unadaptable:
        lines.append(f"  the file adapts {', '.join(map(layer_path, unadaptable))}, which jaxvlm cannot")
        return "\n".join(lines)
    layers = [layer for layer in linear_layers(base) if layer in adapted]
    pattern = "^(" + "|".join(re.escape(layer_path(layer)) for layer in layers) + ")$"
    lines.append(f"  the file adapts {', '.join(map(layer_path, layers))}: config.model.lora.targets={[pattern]!r}")
    return "\n".join(lines)
