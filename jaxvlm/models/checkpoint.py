"""Hugging Face checkpoint I/O without torch: safetensors in, safetensors out.

Parameter paths mirror the transformers module names, so the mapping is a few renames. Qwen2.5-VL and the text-only
decoders (Qwen2, Qwen3, Llama):

  ours                                         Hugging Face (on-disk names, as `save_pretrained` writes them)
  language_model/embed_tokens/embedding        model.embed_tokens.weight
  language_model/layers/<sub>/kernel   [L,..]  model.layers.{i}.<sub>.weight          (transposed)
  language_model/norm/scale                    model.norm.weight
  visual/patch_embed/kernel                    visual.patch_embed.proj.weight         (Conv3d [D, C, T, p, p])
  visual/blocks/<sub>/...              [L,..]  visual.blocks.{i}.<sub>....
  visual/merger/fc1, fc2                       visual.merger.mlp.0, visual.merger.mlp.2
  lm_head/kernel                               lm_head.weight                         (absent when tied)

transformers 5 in-memory names (`model.language_model.*`, `model.visual.*`) are accepted on load as well.

Qwen3-VL: transformers 5 writes its in-memory names, `model.language_model.*` for `language_model/*` (as above) and
`model.visual.*` for `visual/*`:

  visual/patch_embed/kernel, bias                model.visual.patch_embed.proj.weight, .bias  (Conv3d)
  visual/pos_embed/embedding                     model.visual.pos_embed.weight
  visual/blocks/<sub>/...               [L,..]   model.visual.blocks.{i}.<sub>....            (LayerNorm scale: weight)
  visual/merger/<sub>/...                        model.visual.merger.<sub>....                (norm, linear_fc1, _fc2)
  visual/deepstack_merger_list/<sub>/.. [k,..]   model.visual.deepstack_merger_list.{j}.<sub>....
  lm_head/kernel                                 lm_head.weight                               (absent when tied)

and the Qwen2.5-VL-style names (`model.layers.*`, `visual.*`) are accepted on load as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxvlm.models import config as config_lib
from jaxvlm.models import lora
from jaxvlm.models.builder import abstract_params, build_model

DTypeLike = Any  # a dtype name, alias or numpy / JAX dtype: see config.canonical_dtype

# ----------------------------------------------------------------------------------------------------------
# safetensors file format (8-byte little-endian header length, JSON header, raw little-endian data)
# ----------------------------------------------------------------------------------------------------------

# The reference implementation's limit (safetensors' MAX_HEADER_SIZE); real headers are a few MB at most.
MAX_HEADER_BYTES = 100_000_000
# Bits per element of every dtype the safetensors format defines.
ST_DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# The dtypes a tensor can be read as (F4 / F6 pack several elements into a byte: numpy has no view of them).
_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
# The dtypes a model weight may have on disk (converted to param_dtype on load).
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
CheckpointError = config_lib.CheckpointError


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model built from its config.json: missing, unexpected, mis-shaped or
    of a dtype that is not a floating-point weight."""


class _HeaderJSONError(ValueError):
    """JSON that Python's json module reads but the safetensors format does not allow."""


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: the safetensors format disallows duplicate keys (json keeps the last silently), and its
    strings are UTF-8 (json lets "\\ud800" through as a lone surrogate)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _HeaderJSONError(f"duplicate key {duplicate!r}")
    for text in (t for pair in pairs for t in pair if isinstance(t, str)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _HeaderJSONError(f"string {_short(text)} is not Unicode text ({e.reason})") from e
    return d


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, checked: data bytes [begin, end) of the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _header_bytes(path: str, f, file_size: int) -> bytes:
    """The JSON header of an open safetensors file, its length checked against the file and MAX_HEADER_BYTES."""
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(
            f"{path}: not a safetensors file ({file_size} bytes, shorter than its 8-byte header length)"
        )
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes "
            "(not a safetensors file, or a corrupt one)"
        )
    if 8 + n > file_size:
        raise CheckpointError(
            f"{path}: header length {n} runs past the end of the file ({file_size} bytes): the file is truncated "
            "(a partial download?) or not a safetensors file"
        )
    return f.read(n)


def _parse_header(path: str, raw: bytes) -> dict[str, Any]:
    """The header's JSON object: UTF-8, starting with '{' (trailing spaces allowed), no duplicate keys, no NaN."""
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt safetensors header: it must start with '{{', got {raw[:16]!r}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: not UTF-8 at byte {8 + e.start}") from e
    try:
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_reject_constant)
    except RecursionError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: JSON nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, a duplicate key, NaN / Infinity
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e


def _check_metadata(path: str, metadata: Any) -> dict[str, str]:
    """__metadata__: absent / null, or a string -> string map (the format allows nothing else)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {_short(metadata)}")
    return metadata


def _check_entry(path: str, name: str, entry: Any) -> TensorEntry:
    """One header entry: exactly dtype / shape / data_offsets, typed, and a byte range as long as dtype and shape
    need."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{where}: header entry must be an object with {list(_ENTRY_FIELDS)}, got {_short(entry)}"
        )
    missing = [k for k in _ENTRY_FIELDS if k not in entry]
    extra = sorted(k for k in entry if k not in _ENTRY_FIELDS)
    if missing or extra:
        found = f"missing {missing}" if missing else f"unexpected {extra}"
        raise CheckpointError(f"{where}: header entry must have exactly {list(_ENTRY_FIELDS)} ({found})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPE_BITS:
        raise CheckpointError(
            f"{where}: unknown dtype {_short(dtype)} (safetensors dtypes: {', '.join(ST_DTYPE_BITS)})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(
            f"{where}: data_offsets must be two non-negative integers [begin, end], got {_short(offsets)}"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    bits = math.prod(shape) * ST_DTYPE_BITS[dtype]
    if bits % 8:
        raise CheckpointError(f"{where}: {dtype} {shape} is {bits} bits, not a whole number of bytes")
    if end - begin != bits // 8:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype} of shape {shape} needs "
            f"{bits // 8}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_layout(path: str, entries: dict[str, TensorEntry], data_bytes: int, file_size: int) -> None:
    """The tensors tile the data section: in offset order each begins where the previous ends, the first at 0, the
    last at the end of the file (the format allows no overlaps, holes or trailing bytes)."""
    ordered = sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end))
    beyond = next(((n, e) for n, e in ordered if e.end > data_bytes), None)
    if beyond is not None:
        name, e = beyond
        raise CheckpointError(
            f"{path}: tensor {name!r} needs data bytes [{e.begin}, {e.end}), but the file ({file_size} bytes) holds "
            f"only {data_bytes} data bytes: the file is truncated (a partial download?) or its header is corrupt"
        )
    position, previous = 0, None
    for name, e in ordered:
        if e.begin < position:
            raise CheckpointError(
                f"{path}: tensor {name!r} (data bytes [{e.begin}, {e.end})) overlaps tensor {previous!r}, which ends "
                f"at {position}"
            )
        if e.begin > position:
            raise CheckpointError(
                f"{path}: data bytes [{position}, {e.begin}) before tensor {name!r} belong to no tensor (the format "
                "allows no holes)"
            )
        position, previous = e.end, name
    if position != data_bytes:
        raise CheckpointError(
            f"{path}: {data_bytes - position} bytes after the last tensor ({previous!r}, ending at {position}) belong "
            f"to no tensor (the data section is {data_bytes} bytes; the format allows no trailing bytes)"
        )


class SafetensorsFile:
    """One .safetensors file, its header checked against the file when opened; tensors are read lazily through a
    read-only memory map.

    Opening raises CheckpointError naming the file (and the tensor) for everything the format lets us see: a header
    length beyond the file or the 100 MB limit, a header that is not a UTF-8 JSON object (or has duplicate keys),
    entries without exactly dtype / shape / data_offsets, unknown dtypes, byte ranges that are not dtype x shape long,
    and ranges that do not tile the data section (overlaps, holes, trailing bytes, a truncated file). Three rules the
    format's README states are enforced here but not by safetensors' own reader: the header starts with '{', has no
    duplicate keys, and its entries have no fields beyond those three.

    What no reader can see: a dtype relabelled to another of the same width (F32 <-> I32 / U32, F16 <-> BF16), or the
    offsets of two same-sized tensors swapped, gives a valid file with other values. `load_pretrained` rejects a
    weight whose dtype is not floating point (I32 for F32), so of these only F16 <-> BF16 and swapped ranges load.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self.file_size = os.fstat(f.fileno()).st_size
            raw = _header_bytes(path, f, self.file_size)
        header = _parse_header(path, raw)
        self.metadata = _check_metadata(path, header.pop("__metadata__", None))
        self.entries = {name: _check_entry(path, name, entry) for name, entry in header.items()}
        self.data_start = 8 + len(raw)
        _check_layout(path, self.entries, self.file_size - self.data_start, self.file_size)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (F32, BF16, ...)."""
        return self._entry(name).dtype

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self.entries[name]

    def get(self, name: str) -> np.ndarray:
        e = self._entry(name)
        if e.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {e.dtype}, which packs elements into bits")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self.data_start + e.begin : self.data_start + e.end]
        if len(buf) != e.end - e.begin:
            raise CheckpointError(f"{self.path}: the file was truncated after it was opened (tensor {name!r})")
        return buf.view(_ST_DTYPES[e.dtype]).reshape(e.shape)


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.newbyteorder("<") not in _ST_NAMES:
            raise ValueError(f"cannot save tensor {name!r} of dtype {a.dtype} as safetensors")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
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


def _is_plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class CheckpointTensors:
    """All tensors of a checkpoint directory (single file or sharded with model.safetensors.index.json).

    A sharded checkpoint's index is checked against its shards: its weight_map maps tensor names to plain file names
    in the directory, each of which exists, is a valid safetensors file and holds the tensor, and every tensor of
    those shards is in the weight_map. Anything else raises CheckpointError naming the index and the tensor."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            self._open_shards(path, index)
        elif os.path.exists(single):
            self.files["model.safetensors"] = SafetensorsFile(single)
            self.where = {k: "model.safetensors" for k in self.files["model.safetensors"].keys()}
        else:
            found = sorted(os.listdir(path)) if os.path.isdir(path) else []
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {path} (found: {found}); "
                "jaxvlm reads safetensors only (convert .bin checkpoints with transformers first)"
            )

    def _open_shards(self, path: str, index: str) -> None:
        weight_map = _read_weight_map(index)
        for name, file in weight_map.items():
            if file not in self.files:
                full = os.path.join(path, file)
                if not os.path.isfile(full):
                    raise CheckpointError(
                        f"{index}: weight_map maps {name!r} to shard {file!r}, which is not in {path}"
                    )
                self.files[file] = SafetensorsFile(full)
            if name not in self.files[file].entries:
                raise CheckpointError(f"{index}: weight_map maps {name!r} to {file}, but that shard has no such tensor")
            self.where[name] = file
        for file, shard in self.files.items():
            unlisted = sorted(n for n in shard.keys() if weight_map.get(n) != file)
            if unlisted:
                raise CheckpointError(
                    f"{index}: shard {file} holds tensors the weight_map does not map to it ({len(unlisted)}): "
                    f"{', '.join(map(repr, unlisted[:5]))}" + (" ..." if len(unlisted) > 5 else "")
                )

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def dtype(self, name: str) -> str:
        return self.files[self.where[name]].dtype(name)

    def file(self, name: str) -> str:
        """The file (in the checkpoint directory) holding tensor `name`."""
        return self.where[name]

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)


def _read_weight_map(index: str) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file name), checked."""
    try:
        with open(index, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, RecursionError, ValueError) as e:  # ValueError: JSONDecodeError
        raise CheckpointError(f"{index}: not a JSON index ({e})") from e
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f'{index}: must be a JSON object with a "weight_map" object (tensor name -> shard file)')
    for name, file in weight_map.items():
        if not _is_plain_file_name(file):
            raise CheckpointError(
                f"{index}: weight_map[{name!r}] must be the file name of a shard in the directory, got {_short(file)}"
            )
    return weight_map


# ----------------------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------------------

# Parameter path prefixes whose leaves are stacked over layers (a leading [L] axis), and how many there are.
_STACKED = {
    ("language_model", "layers"): lambda cfg: cfg.text.num_hidden_layers,
    ("visual", "blocks"): lambda cfg: cfg.vision.depth,
    ("visual", "deepstack_merger_list"): lambda cfg: len(cfg.vision.deepstack_visual_indexes),  # Qwen3-VL
}


@dataclasses.dataclass(frozen=True)
class _Names:
    """How one family's tensors are named on disk: `stacked` maps a stacked path prefix (see `_STACKED`) to the HF
    prefix of its layer list, `renames` a path prefix to an HF prefix (the longest matching prefix wins); any other
    path is its names joined by dots."""

    stacked: dict[tuple[str, ...], str]
    renames: dict[tuple[str, ...], str]


_QWEN2_NAMES = _Names(  # Qwen2.5-VL's on-disk names (transformers 5 saves them so), and the text-only decoders'
    stacked={("language_model", "layers"): "model.layers", ("visual", "blocks"): "visual.blocks"},
    renames={
        ("language_model", "embed_tokens"): "model.embed_tokens",
        ("language_model", "norm"): "model.norm",
        ("visual", "patch_embed"): "visual.patch_embed.proj",
        ("visual", "merger", "fc1"): "visual.merger.mlp.0",
        ("visual", "merger", "fc2"): "visual.merger.mlp.2",
    },
)
_QWEN3_VL_NAMES = _Names(  # Qwen3-VL's: transformers 5's module names, on disk as in memory
    stacked={
        ("language_model", "layers"): "model.language_model.layers",
        ("visual", "blocks"): "model.visual.blocks",
        ("visual", "deepstack_merger_list"): "model.visual.deepstack_merger_list",
    },
    renames={
        ("language_model",): "model.language_model",
        ("visual",): "model.visual",
        ("visual", "patch_embed"): "model.visual.patch_embed.proj",
    },
)
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _names(model_type: str) -> _Names:
    return _QWEN3_VL_NAMES if model_type == "qwen3_vl" else _QWEN2_NAMES


def canonical_hf_name(name: str, model_type: str = "qwen2_5_vl") -> str:
    """A tensor name in either form transformers has used -> the form `save_pretrained` writes for `model_type`.

    Qwen2.5-VL and the text-only types: on-disk names (`model.layers.*`, `visual.*`) from transformers 5's in-memory
    names (`model.language_model.*`, `model.visual.*`). Qwen3-VL the other way round: transformers 5 writes its
    in-memory names, and the Qwen2.5-VL-style names are read as those."""
    if model_type == "qwen3_vl":
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
            return "model.language_model." + name[len("model.") :]
        return name
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def _hf_base(path: tuple[str, ...], names: _Names) -> tuple[str, tuple[str, ...] | None, int]:
    """(HF dotted prefix, remaining sub-path or None, stacked?) for a parameter path without its leaf name."""
    for prefix, hf in names.stacked.items():
        if path[: len(prefix)] == prefix:
            return hf, path[len(prefix) :], 1
    matches = [prefix for prefix in names.renames if path[: len(prefix)] == prefix]
    if matches:
        prefix = max(matches, key=len)
        return ".".join((names.renames[prefix], *path[len(prefix) :])), None, 0
    return ".".join(path), None, 0


def hf_names(path: tuple[str, ...], cfg: config_lib.ModelConfig) -> list[str]:
    """HF tensor name(s) of one parameter leaf of `cfg`'s model; stacked leaves give one name per layer."""
    *module, leaf = path
    base, sub, stacked = _hf_base(tuple(module), _names(cfg.model_type))
    suffix = _LEAF[leaf]
    if stacked:
        return [".".join((base, str(i), *sub, suffix)) for i in range(_num_layers(path, cfg))]
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
    """The length of a stacked parameter's leading axis, None for a parameter that is not stacked."""
    count = _STACKED.get(path[:2])
    return None if count is None else count(cfg)


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


def load_pretrained(path: str, dtype: DTypeLike = "float32", param_dtype: DTypeLike | None = None, **config_overrides):
    """Load a Qwen2.5-VL, Qwen3-VL or text-only Qwen2 / Qwen2.5 / Qwen3 / Llama checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded model.safetensors.index.json).
      dtype: compute dtype: a name ("float32", "bfloat16", "float16", "float64"), an alias ("bf16") or the numpy /
        JAX dtype (jnp.bfloat16); see `config.canonical_dtype`.
      param_dtype: storage dtype of the returned params, in the same forms (default: `dtype`); use "float32" with
        dtype="bfloat16" for fp32 master weights.
      **config_overrides: other ModelConfig fields, e.g. remat="full".
    Returns:
      (model, params): the linen module of its model_type (`builder.build_model`) and its params (nested dict of
      jax arrays).
    Raises:
      CheckpointError (a ValueError) naming the file and the field or tensor when config.json, a .safetensors file or
      the shard index is malformed (see `config.from_hf_dict`, `SafetensorsFile`, `CheckpointTensors`);
      CheckpointMismatchError (a CheckpointError) naming every missing, unexpected, mis-shaped and non-float tensor;
      ValueError naming `dtype` or `param_dtype` when it is not a supported dtype.
    """
    # `is None`, not `or`: a np.dtype is falsy (it has len 0).
    param_dtype = dtype if param_dtype is None else param_dtype
    cfg = config_lib.load_hf_config(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors = CheckpointTensors(path)
    available = _canonical_names(path, tensors, cfg.model_type)
    _check_size(path, cfg, tensors)
    target = np.dtype(jnp.dtype(cfg.param_dtype))
    missing, misshaped, mistyped, used, params = [], [], [], set(), {}
    for p, leaf in _leaves(_model_shapes(cfg.replace(lora=None))):  # the base weights; adapters come separately
        layers = _num_layers(p, cfg)
        names = hf_names(p, cfg)
        want = _expected_hf_shape(p, leaf.shape, layers is not None, cfg)
        parts = []
        for name in names:
            if name not in available:
                missing.append(name)
                continue
            used.add(name)
            stored = available[name]
            got, stored_dtype = tensors.shape(stored), tensors.dtype(stored)
            if got != want:
                misshaped.append(f"{name}: checkpoint {list(got)} vs model {list(want)} in {tensors.file(stored)}")
            elif stored_dtype not in WEIGHT_DTYPES:
                mistyped.append(f"{name}: {stored_dtype} in {tensors.file(stored)}")
            else:
                parts.append(_from_hf(p, tensors.get(stored)).astype(target))
        if not names:  # a stack of no layers (Qwen3-VL without DeepStack features)
            _set(params, p, jnp.zeros(leaf.shape, target))
        elif len(parts) == len(names):
            _set(params, p, jnp.asarray(np.stack(parts) if layers is not None else parts[0]))
    unexpected = [n for n in available if n not in used and not _ignorable(n, cfg)]
    if missing or misshaped or mistyped or unexpected:
        lines = [f"checkpoint {path} does not match its config.json:"]
        if missing:
            lines.append(
                f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else "")
            )
        if misshaped:
            lines.append(f"  mis-shaped tensors ({len(misshaped)}): " + "; ".join(misshaped[:20]))
        if mistyped:
            lines.append(
                f"  tensors of a dtype that is no weight's ({len(mistyped)}; weights are {', '.join(WEIGHT_DTYPES)}): "
                + "; ".join(mistyped[:20])
            )
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")
        raise CheckpointMismatchError("\n".join(lines))
    return build_model(cfg), params


@functools.lru_cache(maxsize=8)
def _model_shapes(cfg: config_lib.ModelConfig) -> dict:
    """abstract_params, traced once per config (loading several checkpoints of one model traces the init once)."""
    return abstract_params(cfg)


def _canonical_names(path: str, tensors: CheckpointTensors, model_type: str) -> dict[str, str]:
    """On-disk name (see canonical_hf_name) -> the name stored in the checkpoint; one tensor stored under both its
    transformers-5 and its on-disk name is an error (which copy would load?)."""
    available = {}
    for stored in tensors.names():
        name = canonical_hf_name(stored, model_type)
        if name in available:
            raise CheckpointError(
                f"checkpoint {path} holds {name!r} twice: as {available[name]!r} ({tensors.file(available[name])}) "
                f"and as {stored!r} ({tensors.file(stored)})"
            )
        available[name] = stored
    return available


def _check_size(path: str, cfg: config_lib.ModelConfig, tensors: CheckpointTensors) -> None:
    """A config whose model has more than twice as many parameters as the checkpoint holds values is another model's
    (or has a corrupt size field): say so before tracing a model of that size or listing its every missing tensor."""
    wanted = config_lib.num_params(cfg)
    stored = sum(math.prod(tensors.shape(name)) for name in tensors.names())
    if wanted > 2 * stored:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match its config.json: the config describes a model of {wanted:,} "
            f"parameters, but the checkpoint's tensors hold {stored:,} values (a config.json of another model, or a "
            "corrupt size field)"
        )


def _ignorable(name: str, cfg) -> bool:
    # A tied checkpoint may still carry a copy of the head; rotary buffers are recomputed.
    return (cfg.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def save_pretrained(
    model: nn.Module,
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
    if lora.has_adapters(params):  # the Hugging Face format has no place for them: fold them into the kernels
        params = lora.merged(params, cfg.lora)
    dtype = cfg.param_dtype if dtype is None else config_lib.canonical_dtype(dtype, "dtype")
    target = np.dtype(jnp.dtype(dtype))
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for p, leaf in _leaves(jax.device_get(params)):
        layers = _num_layers(p, cfg)
        names = hf_names(p, cfg)
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
