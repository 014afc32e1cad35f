"""Device mesh and partition rules.

The mesh has three axes, `("data", "fsdp", "tensor")`:
* batch rows are split over `data` x `fsdp` (both are data parallel for activations);
* parameters (and the optimizer state that mirrors them) are split over `fsdp` along the model dimension D
  (ZeRO-3 / FSDP: each device holds 1/fsdp of every weight, gathered on use) and over `tensor` along heads, MLP
  width and vocabulary (Megatron-style tensor parallelism);
* everything else is replicated.

Every parameter of `Qwen25VL` has a rule (`PARAM_RULES`, first regex match wins, matched against the "/"-joined
param path); a dimension is only split when the mesh axis divides it, so odd sizes fall back to replication
instead of failing. One device is a (1, 1, 1) mesh: nothing is special-cased.
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
    # Norm scales and the remaining biases (of outputs that are not split) stay replicated.
    (r".*", ()),
)


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
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=PARAM_RULES) -> P:
    """PartitionSpec of one array from the first matching rule; axes that do not divide the dim are dropped."""
    for pattern, trailing in rules:
        if re.search(pattern, path):
            break
    else:  # pragma: no cover - the last rule matches everything
        trailing = ()
    trailing = tuple(trailing)[-len(shape):] if shape else ()
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


def tree_shardings(tree: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    """NamedShardings for every leaf of `tree` (params, or an optimizer state whose leaves end in param paths:
    optax's mu/nu mirror the params, so the same regexes find them). Scalars are replicated."""

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, rules) if shape else P())

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_spec(ndim: int, batch_axis: int = 0, axes: tuple[str, ...] = BATCH_AXES) -> P:
    spec = [None] * ndim
    spec[batch_axis] = axes
    return P(*spec)


def batch_shardings(
    batch: Any, mesh: Mesh, row_axes: dict[str, int | None] | None = None, default_axis: int = 0,
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
    "BATCH", "BATCH_AXES", "MESH_AXES", "constrain", "traced_on", "PARAM_RULES", "batch_shardings", "batch_spec", "data_parallel_size", "describe",
    "make_mesh", "path_str", "replicated", "spec_for", "tree_shardings",
]
