"""Hugging Face checkpoint I/O without torch: safetensors in, safetensors out.

Parameter paths mirror the transformers module names, so the mapping is a few renames:

  ours                                         Hugging Face (on-disk names, as `save_pretrained` writes them)
  language_model/embed_tokens/embedding        model.embed_tokens.weight
  language_model/layers/<sub>/kernel   [L,..]  model.layers.{i}.<sub>.weight          (transposed)
  language_model/norm/scale                    model.norm.weight
  visual/patch_embed/kernel                    visual.patch_embed.proj.weight         (Conv3d [D, C, T, p, p])
  visual/blocks/<sub>/...              [L,..]  visual.blocks.{i}.<sub>....
  visual/merger/fc1, fc2                       visual.merger.mlp.0, visual.merger.mlp.2
  lm_head/kernel                               lm_head.weight                         (absent when tied)

transformers 5 in-memory names (`model.language_model.*`, `model.visual.*`) are accepted on load as well.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxvlm.models import config as config_lib
from jaxvlm.models.qwen2_5_vl import Qwen25VL, abstract_params

DTypeLike = Any  # a dtype name, alias or numpy / JAX dtype: see config.canonical_dtype

# ----------------------------------------------------------------------------------------------------------
# safetensors file format (8-byte little-endian header length, JSON header, raw little-endian data)
# ----------------------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Lazily reads tensors of one .safetensors file through a read-only memory map."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = np.frombuffer(raw, "<u8")
            try:
                header = json.loads(f.read(int(n)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + int(n)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self.header[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        buf = self._mmap[self.data_start + begin : self.data_start + end]
        return buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {a.dtype} as safetensors")
        arrays[name] = a
        header[name] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(np.uint64(len(blob)).tobytes())
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())


class CheckpointTensors:
    """All tensors of a checkpoint directory (single file or sharded with model.safetensors.index.json)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for name, file in weight_map.items():
                if file not in self.files:
                    full = os.path.join(path, file)
                    if not os.path.exists(full):
                        raise FileNotFoundError(f"{index} names shard {file!r}, which does not exist")
                    self.files[file] = SafetensorsFile(full)
                if name not in self.files[file].header:
                    raise ValueError(f"{index} maps {name!r} to {file}, but that shard has no such tensor")
                self.where[name] = file
        elif os.path.exists(single):
            self.files["model.safetensors"] = SafetensorsFile(single)
            self.where = {k: "model.safetensors" for k in self.files["model.safetensors"].keys()}
        else:
            found = sorted(os.listdir(path)) if os.path.isdir(path) else []
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {path} (found: {found}); "
                "jaxvlm reads safetensors only (convert .bin checkpoints with transformers first)"
            )

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)


# ----------------------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------------------

_STACKED = {("language_model", "layers"): "model.layers", ("visual", "blocks"): "visual.blocks"}
_RENAMES = {
    ("language_model", "embed_tokens"): "model.embed_tokens",
    ("language_model", "norm"): "model.norm",
    ("visual", "patch_embed"): "visual.patch_embed.proj",
    ("visual", "merger", "fc1"): "visual.merger.mlp.0",
    ("visual", "merger", "fc2"): "visual.merger.mlp.2",
}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def canonical_hf_name(name: str) -> str:
    """transformers-5 in-memory names -> on-disk names (the form `save_pretrained` writes)."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def _hf_base(path: tuple[str, ...]) -> tuple[str, tuple[str, ...] | None, int]:
    """(HF dotted prefix, remaining sub-path or None, stacked?) for a parameter path without its leaf name."""
    for prefix, hf in _STACKED.items():
        if path[: len(prefix)] == prefix:
            return hf, path[len(prefix) :], 1
    for prefix, hf in _RENAMES.items():  # no prefix of _RENAMES is a prefix of another
        if path[: len(prefix)] == prefix:
            return ".".join((hf, *path[len(prefix) :])), None, 0
    return ".".join(path), None, 0


def hf_names(path: tuple[str, ...], num_layers: int | None) -> list[str]:
    """HF tensor name(s) of one parameter leaf; stacked leaves give one name per layer."""
    *module, leaf = path
    base, sub, stacked = _hf_base(tuple(module))
    suffix = _LEAF[leaf]
    if stacked:
        return [".".join((base, str(i), *sub, suffix)) for i in range(num_layers)]
    return [f"{base}.{suffix}"]


def _to_hf(path: tuple[str, ...], value: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """One layer's parameter in our layout -> the HF tensor of shape `hf_shape`."""
    if path[-1] == "kernel":
        value = value.T  # [in, out] -> torch's [out, in]; the patch embedding then becomes [D, C, T, p, p]
    return np.ascontiguousarray(value).reshape(hf_shape)


def _from_hf(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if path[:2] == ("visual", "patch_embed"):
        return value.reshape(value.shape[0], -1).T
    return value.T


def _leaves(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _num_layers(path: tuple[str, ...], cfg: config_lib.ModelConfig) -> int | None:
    if path[:2] == ("language_model", "layers"):
        return cfg.text.num_hidden_layers
    if path[:2] == ("visual", "blocks"):
        return cfg.vision.depth
    return None


def _expected_hf_shape(path, leaf_shape, stacked: bool, cfg) -> tuple[int, ...]:
    shape = leaf_shape[1:] if stacked else leaf_shape
    if path[-1] != "kernel":
        return tuple(shape)
    if path[:2] == ("visual", "patch_embed"):
        v = cfg.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(shape[::-1])


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model built from its config.json."""


def load_pretrained(path: str, dtype: DTypeLike = "float32", param_dtype: DTypeLike | None = None, **config_overrides):
    """Load a Qwen2.5-VL or text-only Qwen2 / Qwen2.5 checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded model.safetensors.index.json).
      dtype: compute dtype: a name ("float32", "bfloat16", "float16", "float64"), an alias ("bf16") or the numpy /
        JAX dtype (jnp.bfloat16); see `config.canonical_dtype`.
      param_dtype: storage dtype of the returned params, in the same forms (default: `dtype`); use "float32" with
        dtype="bfloat16" for fp32 master weights.
      **config_overrides: other ModelConfig fields, e.g. remat="full".
    Returns:
      (model, params): a `Qwen25VL` linen module and its params (nested dict of jax arrays).
    Raises:
      CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor; ValueError naming `dtype` or
      `param_dtype` when it is not a supported dtype.
    """
    # `is None`, not `or`: a np.dtype is falsy (it has len 0).
    param_dtype = dtype if param_dtype is None else param_dtype
    cfg = config_lib.load_hf_config(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors = CheckpointTensors(path)
    available = {canonical_hf_name(n): n for n in tensors.names()}
    target = np.dtype(jnp.dtype(cfg.param_dtype))
    missing, misshaped, used, params = [], [], set(), {}
    for p, leaf in _leaves(abstract_params(cfg)):
        layers = _num_layers(p, cfg)
        names = hf_names(p, layers)
        want = _expected_hf_shape(p, leaf.shape, layers is not None, cfg)
        parts = []
        for name in names:
            if name not in available:
                missing.append(name)
                continue
            used.add(name)
            got = tensors.shape(available[name])
            if got != want:
                misshaped.append(f"{name}: checkpoint {list(got)} vs model {list(want)}")
                continue
            parts.append(_from_hf(p, tensors.get(available[name])).astype(target))
        if len(parts) == len(names):
            _set(params, p, jnp.asarray(np.stack(parts) if layers is not None else parts[0]))
    unexpected = [n for n in available if n not in used and not _ignorable(n, cfg)]
    if missing or misshaped or unexpected:
        lines = [f"checkpoint {path} does not match its config.json:"]
        if missing:
            lines.append(
                f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else "")
            )
        if misshaped:
            lines.append(f"  mis-shaped tensors ({len(misshaped)}): " + "; ".join(misshaped[:20]))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")
        raise CheckpointMismatchError("\n".join(lines))
    return Qwen25VL(cfg), params


def _ignorable(name: str, cfg) -> bool:
    # A tied checkpoint may still carry a copy of the head; rotary buffers are recomputed.
    return (cfg.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def save_pretrained(
    model: Qwen25VL,
    params: dict,
    path: str,
    *,
    dtype: DTypeLike | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_dir: str | None = None,
) -> None:
    """Write `path/config.json` and safetensors that `transformers` `from_pretrained` loads.

    Args:
      dtype: storage dtype of the written tensors, in any form `config.canonical_dtype` takes (default: the model's
        param_dtype).
      max_shard_bytes: split into model-0000i-of-0000n.safetensors + index above this size.
      tokenizer_dir: also copy tokenizer / processor files from this directory (e.g. the original checkpoint).
    """
    cfg = model.config
    dtype = cfg.param_dtype if dtype is None else config_lib.canonical_dtype(dtype, "dtype")
    target = np.dtype(jnp.dtype(dtype))
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for p, leaf in _leaves(jax.device_get(params)):
        layers = _num_layers(p, cfg)
        names = hf_names(p, layers)
        values = list(np.asarray(leaf)) if layers is not None else [np.asarray(leaf)]
        for name, v in zip(names, values):
            tensors[name] = _to_hf(p, v, _expected_hf_shape(p, v.shape, False, cfg)).astype(target)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    for old in os.listdir(path):
        if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
            os.remove(os.path.join(path, old))
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, os.path.join(path, file))
            weight_map.update({name: file for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = config_lib.to_hf_dict(cfg.replace(param_dtype=dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir:
        for file in os.listdir(tokenizer_dir):
            if file.startswith(
                (
                    "tokenizer",
                    "special_tokens",
                    "vocab",
                    "merges",
                    "added_tokens",
                    "chat_template",
                    "preprocessor_config",
                    "processor_config",
                    "generation_config",
                )
            ):
                shutil.copy(os.path.join(tokenizer_dir, file), os.path.join(path, file))
