"""Dense and gated-MLP layers with hand-written backward passes (`jax.custom_vjp`).

Same values as `x @ kernel + bias` and `down(act(gate(x)) * up(x))`; what changes is what the backward saves and how
it computes the weight gradients:

* **Weight gradients with one explicit transpose.** dW = x^T dy contracts the row dimension of two row-major
  operands. Left to autodiff, XLA:CPU transposes the operand that an elementwise backward fusion produces
  (SiLU', the gate product, RoPE) and writes it with strided stores inside that fusion: the largest cost of the
  100M SFT step on a CPU after the matmuls (BENCHMARKS.md). Here the narrower operand is transposed on its own
  (a tiled copy) behind an `optimization_barrier`, so XLA cannot fold it back into the dot, and the dot is a plain
  [in, rows] x [rows, out] product. On GPU and TPU this costs one transposed copy of a [rows, D] activation.
* **The gated MLP saves only what it needs**: x, gate(x) and up(x); the activation and its derivative are
  recomputed inside the backward's elementwise fusion instead of keeping act(gate), its derivative and the
  product as separate [rows, I] buffers.

* **The weights' cast to the compute dtype** (`cast`) is done where the layer runs, so XLA cannot hoist a
  bfloat16 copy of every layer's weights out of the layer scan.

Shapes: x [..., D_in] (leading dims are rows), kernels [D_in, D_out] (flax's layout), biases [D_out] or None.
Everything runs in the dtype of its inputs (the caller casts to the compute dtype with `cast`); gradients come back
in those dtypes and the cast's backward takes them to the parameters' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _rows(x: Array) -> Array:
    return x.reshape(-1, x.shape[-1])


def weight_grad(x: Array, dy: Array) -> Array:
    """x^T dy for x [..., D_in], dy [..., D_out] -> [D_in, D_out], transposing the narrower operand explicitly."""
    x2, dy2 = _rows(x), _rows(dy)
    if x2.shape[1] <= dy2.shape[1]:
        return jax.lax.optimization_barrier(x2.T) @ dy2
    return (jax.lax.optimization_barrier(dy2.T) @ x2).T


def _bias_grad(bias, dy: Array):
    return None if bias is None else jnp.sum(_rows(dy), axis=0, dtype=jnp.float32).astype(bias.dtype)


@jax.custom_vjp
def dense(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """x [..., D_in] @ kernel [D_in, D_out] (+ bias [D_out]) -> [..., D_out]."""
    y = x @ kernel
    return y if bias is None else y + bias


def _dense_fwd(x, kernel, bias):
    return dense(x, kernel, bias), (x, kernel, bias)


def _dense_bwd(res, dy):
    x, kernel, bias = res
    return dy @ kernel.T, weight_grad(x, dy).astype(kernel.dtype), _bias_grad(bias, dy)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def low_rank(x: Array, a: Array, b: Array) -> Array:
    """(x @ a) @ b for a LoRA adapter: x [..., D_in], a [D_in, r], b [r, D_out] -> [..., D_out]. The backward forms
    both weight gradients as plain dots that transpose the rank-wide operand (`weight_grad`), never a [rows, D]
    activation; left to autodiff, XLA:CPU transposes the layer's input for dA."""
    return (x @ a) @ b


def _low_rank_fwd(x, a, b):
    low = x @ a
    return low @ b, (x, low, a, b)


def _low_rank_bwd(res, dy):
    x, low, a, b = res
    d_low = dy @ b.T  # [..., r]
    return d_low @ a.T, weight_grad(x, d_low).astype(a.dtype), weight_grad(low, dy).astype(b.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _affine(x, kernel, bias):
    y = x @ kernel
    return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_mlp(act, x, gate, gate_bias, up, up_bias, down, down_bias) -> Array:
    """down(act(gate(x)) * up(x)) with a fused backward. act: an elementwise function (static).

    x [..., D]; gate, up [D, I]; down [I, D_out]; biases [I] / [D_out] or None -> [..., D_out]."""
    return _affine(act(_affine(x, gate, gate_bias)) * _affine(x, up, up_bias), down, down_bias)


def _gated_mlp_fwd(act, x, gate, gate_bias, up, up_bias, down, down_bias):
    g = _affine(x, gate, gate_bias)
    u = _affine(x, up, up_bias)
    out = _affine(act(g) * u, down, down_bias)
    return out, (x, g, u, gate, gate_bias, up, up_bias, down, down_bias)


def _gated_mlp_bwd(act, res, dy):
    x, g, u, gate, gate_bias, up, up_bias, down, down_bias = res
    a, act_vjp = jax.vjp(act, g)
    dh = dy @ down.T  # [..., I]
    du = dh * a
    (dg,) = act_vjp(dh * u)
    dx = dg @ gate.T + du @ up.T
    return (
        dx,
        weight_grad(x, dg).astype(gate.dtype),
        _bias_grad(gate_bias, dg),
        weight_grad(x, du).astype(up.dtype),
        _bias_grad(up_bias, du),
        weight_grad(a * u, dy).astype(down.dtype),
        _bias_grad(down_bias, dy),
    )


gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


def cast(param: Array | None, dtype) -> Array | None:
    """`param.astype(dtype)`, for a layer's float32 weight read in the compute dtype inside the layer scan.

    float32 -> bfloat16 is done on the bits (round to nearest even, as `astype`; NaN stays NaN): XLA moves a plain
    narrowing convert ahead of the scan's per-layer slice and then out of the loop, which keeps a bfloat16 copy of
    every layer's weights alive for the whole step (0.6 GiB per device for the 3B preset under FSDP 8). The
    gradient is the cotangent cast back, as for `astype`."""
    if param is None or param.dtype == dtype:
        return param
    if param.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.bfloat16:
        return _f32_to_bf16(param)
    return param.astype(dtype)


@jax.custom_vjp
def _f32_to_bf16(x: Array) -> Array:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (bits + (jnp.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    out = jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)
    return jnp.where(jnp.isnan(x), jnp.array(jnp.nan, jnp.bfloat16), out)


def _f32_to_bf16_fwd(x):
    return _f32_to_bf16(x), None


def _f32_to_bf16_bwd(_, g):
    return (g.astype(jnp.float32),)


_f32_to_bf16.defvjp(_f32_to_bf16_fwd, _f32_to_bf16_bwd)
