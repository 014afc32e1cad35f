"""Device mesh and partition rules.

The mesh has three axes, `("data", "fsdp", "tensor")`:
* batch rows are split over `data` x `fsdp` (both are data parallel for activations);
* parameters (and the optimizer state that mirrors them) are split over `fsdp` along the model dimension D
  (ZeRO-3 / FSDP: each device holds 1/fsdp of every weight, gathered on use) and over `tensor` along heads, MLP
  width and vocabulary (Megatron-style tensor parallelism);
* everything else is replicated (a parameter only by an explicit rule, see below).

Every parameter of every model family (`jaxvlm.models.builder`) has a rule (`PARAM_RULES`, first regex match wins,
matched against the "/"-joined param path), replicated ones included: a parameter that matches no rule is an error
(`ShardingRuleError`, raised when the shardings are computed, i.e. when a stage starts: `train_steps.state_shardings`),
so a renamed or new submodule cannot be replicated silently. A dimension is only split when the mesh axis divides it,
so odd sizes fall back to replication instead of failing. One device is a (1, 1, 1) mesh: nothing is special-cased.
LoRA adapters (`jaxvlm.models.lora`) follow their kernel's rule: A [.., in, r] is split along `in` as the kernel is,
B [.., r, out] along `out`; the rank dimension is never split.

The optimizer state is placed by the parameters it mirrors (`opt_state_shardings`: optax's mu/nu leaves end in a
parameter's path and get that parameter's rule); its scalar bookkeeping (step counts) is replicated without
consulting the rules, and any other leaf is an error too.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
BATCH = BATCH_AXES  # an activation's row dimension, in `constrain` specs

# (regex on the param path, spec of the trailing dims). Stacked layers carry a leading layer axis that is never
# split (the rule's spec applies to the last len(spec) dims; leading dims are None).
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    # Decoder
    (r"embed_tokens/embedding$", ("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel$", ("fsdp", "tensor")),  # [D, V]
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", ("fsdp", "tensor")),  # [L, D, heads*hd]
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", ("tensor",)),  # [L, heads*hd]
    (r"self_attn/o_proj/kernel$", ("tensor", "fsdp")),  # [L, H*hd, D]
    (r"layers/mlp/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),  # [L, D, I]
    (r"layers/mlp/down_proj/kernel$", ("tensor", "fsdp")),  # [L, I, D]
    (r"layers/mlp/(gate_proj|up_proj)/bias$", ("tensor",)),  # [L, I] (Llama with mlp_bias)
    # Vision tower
    (r"visual/patch_embed/kernel$", (None, "fsdp")),  # [patch_dim, Dv]
    (r"attn/qkv/kernel$", ("fsdp", "tensor")),  # [depth, Dv, 3 Dv]
    (r"attn/qkv/bias$", ("tensor",)),
    (r"attn/proj/kernel$", ("tensor", "fsdp")),  # [depth, Dv, Dv]
    (r"blocks/mlp/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),  # [depth, Dv, Iv]
    (r"blocks/mlp/(gate_proj|up_proj)/bias$", ("tensor",)),
    (r"blocks/mlp/down_proj/kernel$", ("tensor", "fsdp")),  # [depth, Iv, Dv]
    (r"merger/fc1/kernel$", ("fsdp", "tensor")),  # [4 Dv, 4 Dv]
    (r"merger/fc1/bias$", ("tensor",)),
    (r"merger/fc2/kernel$", ("tensor", "fsdp")),  # [4 Dv, D]
    # Qwen3-VL's vision tower (plain MLP, biased patch embedding, DeepStack mergers stacked on a leading axis)
    (r"blocks/mlp/linear_fc1/kernel$", ("fsdp", "tensor")),  # [depth, Dv, Iv]
    (r"blocks/mlp/linear_fc1/bias$", ("tensor",)),
    (r"blocks/mlp/linear_fc2/kernel$", ("tensor", "fsdp")),  # [depth, Iv, Dv]
    (r"(merger|deepstack_merger_list)/linear_fc1/kernel$", ("fsdp", "tensor")),  # [(k,) 4 Dv, 4 Dv]
    (r"(merger|deepstack_merger_list)/linear_fc1/bias$", ("tensor",)),
    (r"(merger|deepstack_merger_list)/linear_fc2/kernel$", ("tensor", "fsdp")),  # [(k,) 4 Dv, D]
    # Replicated, each with its reason. There is no catch-all: a parameter that matches none of these rules is a
    # `ShardingRuleError`, not silently replicated.
    # Norm scales: one vector of the model width per norm (tiny), applied elementwise to activations that are
    # split by rows, not by width; splitting them would only add a gather per use.
    (r"layers/(input_layernorm|post_attention_layernorm)/scale$", ()),  # [L, D]
    (r"language_model/norm/scale$", ()),  # [D]
    (r"blocks/(norm1|norm2)/scale$", ()),  # [depth, Dv]
    (r"merger/ln_q/scale$", ()),  # [Dv]
    (r"self_attn/(q_norm|k_norm)/scale$", ()),  # [L, Dh] (Qwen3)
    (r"blocks/(norm1|norm2)/bias$", ()),  # [depth, Dv] (Qwen3-VL's LayerNorms)
    (r"(merger|deepstack_merger_list)/norm/(scale|bias)$", ()),  # [Dv] / [k, 4 Dv] (Qwen3-VL)
    # Qwen3-VL's learned position table [num_position_embeddings, Dv] (2.4M values at 2B/4B): each patch gathers
    # 4 rows of it; split along Dv it would need an all-gather per use for a table smaller than one block's qkv.
    (r"visual/pos_embed/embedding$", ()),
    # The patch embedding's bias [Dv] (Qwen3-VL): added to the full-width patch rows.
    (r"visual/patch_embed/bias$", ()),
    # Biases of the projections back to the residual width (their kernels split their input over `tensor`):
    # the output is a full-width row, not split over `tensor`, so its bias is not either (D floats per layer).
    (r"attn/proj/bias$", ()),  # [depth, Dv]
    (r"self_attn/o_proj/bias$", ()),  # [L, D] (Llama with attention_bias)
    (r"layers/mlp/down_proj/bias$", ()),  # [L, D] (Llama with mlp_bias)
    (r"blocks/mlp/down_proj/bias$", ()),  # [depth, Dv]
    (r"merger/fc2/bias$", ()),  # [D]
    (r"blocks/mlp/linear_fc2/bias$", ()),  # [depth, Dv] (Qwen3-VL)
    (r"(merger|deepstack_merger_list)/linear_fc2/bias$", ()),  # [(k,) D] (Qwen3-VL)
)


class ShardingRuleError(ValueError):
    """A parameter whose path matches no rule of `PARAM_RULES`, or an optimizer state leaf that mirrors no parameter
    and is not a scalar (`opt_state_shardings`)."""


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh. `shape` may contain one -1 (inferred); default: all devices on fsdp."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape) if shape is not None else [1, -1, 1]
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh dimension may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=PARAM_RULES) -> P:
    """PartitionSpec of one parameter from the first rule matching `path`; axes that do not divide the dim are
    dropped. Raises `ShardingRuleError` when no rule matches."""
    adapter = re.search(r"/lora_(a|b)$", path)
    if adapter:  # a LoRA adapter: A [.., in, r] splits `in` as its kernel does, B [.., r, out] splits `out`
        kernel = next(
            (tuple(spec) for pattern, spec in rules if re.search(pattern, path[: adapter.start()] + "/kernel")), None
        )
        if kernel is not None:
            kernel = (*(None,) * (2 - len(kernel)), *kernel)[-2:]
            trailing = (kernel[0], None) if adapter.group(1) == "a" else (None, kernel[1])
        else:
            trailing = None
    else:
        trailing = next((tuple(spec) for pattern, spec in rules if re.search(pattern, path)), None)
    if trailing is None:
        raise ShardingRuleError(
            f"parameter {path!r} with shape {tuple(shape)} matches no sharding rule; add a (regex, spec) rule for "
            f"it to jaxvlm.sharding.PARAM_RULES (spec () to replicate it)"
        )
    trailing = trailing[-len(shape) :] if shape else ()
    spec = [None] * (len(shape) - len(trailing)) + list(trailing)
    for i, axis in enumerate(spec):
        if axis is not None and shape[i] % _axis_size(mesh, axis):
            spec[i] = None
    return P(*spec)


def path_str(path) -> str:
    """'a/b/c' from a jax tree path (dict keys, attribute names and sequence indexes)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def tree_shardings(params: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    """NamedShardings for every leaf of a parameter tree (arrays or `jax.ShapeDtypeStruct`s). Every leaf is a
    parameter and needs a rule, scalars included: one that matches none raises `ShardingRuleError` naming it.
    For an optimizer state use `opt_state_shardings`."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_str(path), getattr(leaf, "shape", ()), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, params)


def _mirrored_param(path: str, param_paths: set[str]) -> str | None:
    """The longest parameter path that `path` ends in (whole "/" components), or None."""
    parts = path.split("/")
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        if candidate in param_paths:
            return candidate
    return None


def opt_state_shardings(opt_state: Any, params: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    """NamedShardings for an optimizer state of `params` (optax's, e.g. AdamW's, possibly masked or
    multi-transformed). Each leaf is one of:
    * a per-parameter leaf, whose path ends in a parameter's path (mu/nu, ".../0/mu/language_model/norm/scale"):
      split by that parameter's rule, as the parameter itself;
    * a scalar (step counts of Adam and of the schedule): replicated, without consulting the rules (it is not a
      parameter: there is nothing to split and no rule to name it);
    * anything else (an array that mirrors no parameter) raises `ShardingRuleError`: decide how to place it here
      rather than replicating it silently."""
    param_paths = {path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}

    def one(path, leaf):
        name, shape = path_str(path), tuple(getattr(leaf, "shape", ()))
        param = _mirrored_param(name, param_paths)
        if param is not None:
            return NamedSharding(mesh, spec_for(param, shape, mesh, rules))
        if not shape:
            return NamedSharding(mesh, P())
        raise ShardingRuleError(
            f"optimizer state leaf {name!r} with shape {shape} mirrors no parameter (its path does not end in a "
            f"parameter's path) and is not a scalar; say how to place it in jaxvlm.sharding.opt_state_shardings"
        )

    return jax.tree_util.tree_map_with_path(one, opt_state)


def batch_spec(ndim: int, batch_axis: int = 0, axes: tuple[str, ...] = BATCH_AXES) -> P:
    spec = [None] * ndim
    spec[batch_axis] = axes
    return P(*spec)


def batch_shardings(
    batch: Any,
    mesh: Mesh,
    row_axes: dict[str, int | None] | None = None,
    default_axis: int = 0,
    axes: tuple[str, ...] = BATCH_AXES,
) -> Any:
    """Shardings for a batch dict: each leaf's row axis (`row_axes[name]`, else `default_axis`) over the mesh's
    batch `axes` (data x fsdp). Leaves listed with axis None (e.g. pixel patches and vision metadata, which are
    not per row) and scalars are replicated."""
    row_axes = row_axes or {}
    size = _axis_size(mesh, tuple(axes))

    def one(path, leaf):
        name = path_str(path).split("/")[-1]
        axis = row_axes.get(name, default_axis)
        if axis is None or getattr(leaf, "ndim", 0) <= axis:
            return NamedSharding(mesh, P())
        rows = leaf.shape[axis]
        if rows % size:
            raise ValueError(
                f"batch field {path_str(path)!r} has {rows} rows on axis {axis}, not divisible by the "
                f"{size} data-parallel devices of mesh {dict(mesh.shape)}"
            )
        return NamedSharding(mesh, batch_spec(leaf.ndim, axis, tuple(axes)))

    return jax.tree_util.tree_map_with_path(one, batch)


def constrain(x, *spec):
    """`x` constrained to `spec` (one entry per dim: None, a mesh axis name, a tuple of names, or BATCH for the
    data-parallel axes) on the mesh in context (`jax.sharding.get_abstract_mesh()`: the steps and the sampler
    trace under their mesh); a no-op without one. Axes that the mesh lacks or that do not divide the dimension are
    dropped, so the same model code runs on one device, any mesh, and for any batch size.

    This is what keeps activations split by rows under FSDP: without it XLA propagates the parameters' split on
    the model dimension into the activations and all-reduces every projection's output."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    fitted = []
    for dim, axes in zip(x.shape, spec):
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in mesh.axis_names)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(names if names and size > 1 and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*fitted))


def traced_on(fn, mesh: Mesh | None):
    """`fn` traced with `mesh` as the abstract mesh in context, so `constrain` inside it sees the mesh (jit it
    after wrapping). With mesh None, `fn` itself."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def describe(tree: Any) -> dict[str, str]:
    """{path: spec} of a sharded tree, for logs and tests."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", leaf)
        out[path_str(path)] = str(getattr(sharding, "spec", sharding))
    return out


__all__ = [
    "BATCH",
    "BATCH_AXES",
    "MESH_AXES",
    "PARAM_RULES",
    "ShardingRuleError",
    "batch_shardings",
    "batch_spec",
    "constrain",
    "data_parallel_size",
    "describe",
    "make_mesh",
    "opt_state_shardings",
    "path_str",
    "replicated",
    "spec_for",
    "traced_on",
    "tree_shardings",
]
