"""`jaxvlm.models.fused`: the dense, gated-MLP and LoRA low-rank layers with hand-written backwards equal plain
autodiff, and the weights' cast to bfloat16 equals `astype` bit for bit (the TPU-side reason for it is tested in
test_bench_memory.py::test_layer_weights_are_cast_inside_the_layer_loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.models import fused


def test_cast_to_bfloat16_equals_astype_bit_for_bit():
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (random_bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly halfway: rounds to even
    special = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            1e-45,
            -1e-45,
            1.1754942e-38,
            3.3895314e38,
            3.4028235e38,
            -3.4028235e38,
        ],
        np.float32,
    )
    x = np.concatenate([random_bits.view(np.float32), ties.view(np.float32), special])
    got = np.asarray(jax.jit(fused.cast, static_argnums=1)(jnp.asarray(x), jnp.bfloat16))
    want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    nan = np.isnan(x)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got[nan].astype(np.float32)).all()


def test_cast_gradient_and_other_dtypes():
    x = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float32)
    g = jax.grad(lambda w: jnp.sum(fused.cast(w, jnp.bfloat16).astype(jnp.float32) * x))(x)
    assert g.dtype == jnp.float32
    np.testing.assert_array_equal(g, x.astype(jnp.bfloat16).astype(jnp.float32))
    assert fused.cast(None, jnp.bfloat16) is None and fused.cast(x, jnp.float32) is x
    np.testing.assert_array_equal(fused.cast(x, jnp.float16), x.astype(jnp.float16))


def _params(key, d_in, d_out, bias):
    k1, k2 = jax.random.split(key)
    return (
        jax.random.normal(k1, (d_in, d_out)) / np.sqrt(d_in),
        jax.random.normal(k2, (d_out,)) * 0.1 if bias else None,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_dense_equals_autodiff(bias):
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    w, b = _params(jax.random.key(2), 12, 20, bias)
    dy = jax.random.normal(jax.random.key(3), (2, 5, 20))

    def plain(x, w, b):
        return x @ w + (0.0 if b is None else b)

    def vjp(f):
        y, back = jax.vjp(f, x, w, b)
        return y, back(dy)

    got, want = vjp(fused.dense), vjp(plain)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias,act", [(True, jax.nn.silu), (False, jax.nn.silu), (False, jax.nn.gelu)])
def test_gated_mlp_equals_autodiff(bias, act):
    x = jax.random.normal(jax.random.key(4), (3, 4, 16))
    (gate, gate_b), (up, up_b) = (_params(jax.random.key(k), 16, 24, bias) for k in (5, 6))
    down, down_b = _params(jax.random.key(7), 24, 16, bias)
    dy = jax.random.normal(jax.random.key(8), (3, 4, 16))
    weights = (gate, gate_b, up, up_b, down, down_b)

    def affine(h, w, b):
        return h @ w + (0.0 if b is None else b)

    def plain(x, gate, gate_b, up, up_b, down, down_b):
        return affine(act(affine(x, gate, gate_b)) * affine(x, up, up_b), down, down_b)

    def vjp(f):
        y, back = jax.vjp(f, x, *weights)
        return y, back(dy)

    got = vjp(lambda *a: fused.gated_mlp(act, *a))
    want = vjp(plain)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_low_rank_equals_autodiff():
    """The LoRA branch (x a) b: values and the gradients of x, a and b equal autodiff's."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    a = jax.random.normal(jax.random.key(2), (12, 3))
    b = jax.random.normal(jax.random.key(3), (3, 20))
    dy = jax.random.normal(jax.random.key(4), (2, 5, 20))

    def vjp(f):
        y, back = jax.vjp(f, x, a, b)
        return y, back(dy)

    got, want = vjp(fused.low_rank), vjp(lambda x, a, b: (x @ a) @ b)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
