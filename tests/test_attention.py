"""`jaxvlm.models.attention`: every implementation against `reference_attention` (values and gradients), the
reference against NumPy, TPU lowering of the splash kernel, and the choice of implementation.

Tolerances: float32 |x - ref| <= 1e-5 + 1e-5 |ref| elementwise (inputs and cotangents ~ N(0, 1), so outputs and
gradients are O(1)); bfloat16 2e-2 + 2e-2 |ref|; cuDNN on a GPU (bf16) 2e-2 of each array's largest |ref|.
The cuDNN parity test runs only where JAX's default backend is a GPU; the tests' conftest defaults JAX_PLATFORMS to
cpu, so run it with e.g. `JAX_PLATFORMS=cuda,cpu python -m pytest -q tests/test_attention.py -k cudnn`.
"""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import sharding
from jaxvlm.models import attention as attn

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)

# Rows of segment ids, one layout per row (T >= 12): every mask the model builds, and a fully padded row.
LAYOUTS = ("full", "left", "right", "both", "packed", "empty")
# Causal rows of the text layout only (what the cudnn path's causal roll accepts).
TEXT_LAYOUTS = ("full", "left", "right", "both", "empty")


def segment_row(layout: str, t: int) -> np.ndarray:
    """int32 [t] segment ids of one row: padding (0) at the left, right or both ends, packed segments 1, 2, 3
    with padding between and after them (several images in one vision slot), or all padding."""
    row = np.ones(t, np.int32)
    if layout == "left":
        row[: t // 3] = 0
    elif layout == "right":
        row[t - t // 4 :] = 0
    elif layout == "both":
        row[: t // 4] = 0
        row[t - t // 5 :] = 0
    elif layout == "packed":
        row[t // 3 :] = 2
        row[t // 3 + 1] = 0
        row[2 * t // 3 :] = 3
        row[t - 2 :] = 0
    elif layout == "empty":
        row[:] = 0
    return row


def make_inputs(t, heads, kv_heads, d, layouts=LAYOUTS, dtype=jnp.float32, seed=0):
    """q [B, t, heads, d], k, v [B, t, kv_heads, d] ~ N(0, 1), segment ids [B, t] (one row per layout), and a
    random output cotangent [B, t, heads, d]."""
    r = np.random.default_rng(seed)
    b = len(layouts)
    q, k, v, g = (jnp.asarray(r.normal(size=(b, t, h, d)), dtype) for h in (heads, kv_heads, kv_heads, heads))
    seg = jnp.asarray(np.stack([segment_row(layout, t) for layout in layouts]))
    return q, k, v, seg, g


def value_and_grads(fn, q, k, v, seg, g, *, causal):
    """fn's output and the gradients of <fn(q, k, v), g> w.r.t. q, k, v, under jit."""

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, causal=causal), q, k, v)
        return out, vjp(g.astype(out.dtype))

    return run(q, k, v)


@functools.cache
def reference(t, heads, kv_heads, d, *, causal, layouts=LAYOUTS, dtype=jnp.float32):
    """`value_and_grads` of `reference_attention` on `make_inputs(t, heads, kv_heads, d, layouts, dtype)`,
    computed once per configuration (tests of several implementations share it)."""
    q, k, v, seg, g = make_inputs(t, heads, kv_heads, d, layouts=layouts, dtype=dtype)
    return value_and_grads(attn.reference_attention, q, k, v, seg, g, causal=causal)


def assert_close(got, want, tol):
    """Every array of `got` equals the matching one of `want` within tol (compared in float32)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def assert_close_at_scale(got, want, atol):
    """Like `assert_close`, with |x - ref| <= atol * (the largest |ref| in `want`): for trees whose values are
    far from O(1)."""
    scale = max(float(jnp.abs(b.astype(jnp.float32)).max()) for b in jax.tree.leaves(want))
    rescale = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32) / scale, tree)
    assert_close(rescale(got), rescale(want), dict(rtol=0, atol=atol))


# ----------------------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------------------


def numpy_attention(q, k, v, seg, causal):
    """Loop-per-query float64 attention: softmax over the keys a query may see, 0 for a query that sees none."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(t) if seg[bi, i] != 0 and seg[bi, j] == seg[bi, i] and (not causal or j <= i)]
                if not keys:
                    continue
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, keys, hi // group]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_numpy(causal):
    q, k, v, seg, _ = make_inputs(12, 4, 2, 8)
    want = numpy_attention(q, k, v, np.asarray(seg), causal)
    got = attn.reference_attention(q, k, v, seg, causal=causal)
    np.testing.assert_allclose(np.asarray(got), want, **F32_TOL)


# ----------------------------------------------------------------------------------------------------------
# "xla"
# ----------------------------------------------------------------------------------------------------------

# name: (H, K, causal, T, block_size). Every case has all LAYOUTS rows. T = 40 with blocks of 16 is 3 blocks
# padded to 48 (T not a multiple of the block); T = 32 is exactly 2 blocks; T = 13 is one dense block (no loop).
XLA_CASES = {
    "mha_causal_padded_blocks": (4, 4, True, 40, 16),
    "gqa2_full_padded_blocks": (4, 2, False, 40, 16),
    "gqa4_causal_exact_blocks": (8, 2, True, 32, 16),
    "gqa2_causal_one_block": (4, 2, True, 13, 16),
    "gqa4_full_one_block": (8, 2, False, 13, 16),
}


@pytest.mark.parametrize("case", list(XLA_CASES))
def test_xla_matches_reference(case):
    heads, kv_heads, causal, t, block = XLA_CASES[case]
    q, k, v, seg, g = make_inputs(t, heads, kv_heads, 16)
    xla = functools.partial(attn.xla_attention, block_size=block)
    got = value_and_grads(xla, q, k, v, seg, g, causal=causal)
    assert_close(got, reference(t, heads, kv_heads, 16, causal=causal), F32_TOL)
    out, grads = got
    padding = np.asarray(seg) == 0
    for x in (out, *grads):  # padding queries output 0; padding is nobody's key: exact zeros, all finite
        assert np.isfinite(np.asarray(x)).all()
        assert (np.asarray(x)[padding] == 0).all()


def test_attention_dispatches_to_xla_on_cpu():
    """`attention` with "xla" and "auto" (on CPU) is the xla path."""
    q, k, v, seg, _ = make_inputs(13, 4, 2, 16)
    run = lambda fn, **kw: jax.jit(functools.partial(fn, causal=True, **kw))(q, k, v, seg)
    want = run(attn.xla_attention)
    for implementation in ("xla", "auto"):
        np.testing.assert_array_equal(run(attn.attention, implementation=implementation), want)


def test_xla_bfloat16():
    q, k, v, seg, g = make_inputs(40, 4, 2, 16, dtype=jnp.bfloat16)
    got = value_and_grads(functools.partial(attn.xla_attention, block_size=16), q, k, v, seg, g, causal=True)
    assert_close(got, reference(40, 4, 2, 16, causal=True, dtype=jnp.bfloat16), BF16_TOL)


class _Layer(nn.Module):
    """x [B, T, F] -> x + attention(q, k, v projections) with 4 query heads on 2 kv heads of 8."""

    impl: object

    @nn.compact
    def __call__(self, x, seg):
        b, t, _ = x.shape
        q = nn.Dense(32, name="q")(x).reshape(b, t, 4, 8)
        k = nn.Dense(16, name="k")(x).reshape(b, t, 2, 8)
        v = nn.Dense(16, name="v")(x).reshape(b, t, 2, 8)
        return x + self.impl(q, k, v, seg, causal=True).reshape(b, t, 32), None


class _Stack(nn.Module):
    """Two `_Layer`s stacked with nn.scan over nn.remat, as the model stacks its layers."""

    impl: object

    @nn.compact
    def __call__(self, x, seg):
        layers = nn.scan(
            nn.remat(_Layer), variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=2
        )
        return layers(self.impl, name="layers")(x, seg)[0]


@pytest.mark.slow
def test_xla_in_jit_vmap_scan_remat():
    """Per-example parameter gradients (jax.vmap over two inputs) of an nn.scan(nn.remat(layer)) stack, in jit,
    equal the reference's, within 1e-5 of the largest gradient (gradients summed over all positions are O(10))."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(2, len(LAYOUTS), 40, 32)), jnp.float32)
    seg = jnp.asarray(np.stack([segment_row(layout, 40) for layout in LAYOUTS]))
    widths = {"q": 32, "k": 16, "v": 16}  # 2 stacked layers of Dense(32 -> width), initialised here (no flax init)
    params = {
        "params": {
            "layers": {
                name: {
                    "kernel": jnp.asarray(r.normal(size=(2, 32, w)) / np.sqrt(32), jnp.float32),
                    "bias": jnp.asarray(r.normal(size=(2, w)) * 0.1, jnp.float32),
                }
                for name, w in widths.items()
            }
        }
    }

    def grads(impl):
        loss = lambda p, x: jnp.sum(jnp.sin(_Stack(impl).apply(p, x, seg)))
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)

    xla = functools.partial(attn.xla_attention, block_size=16)
    assert_close_at_scale(grads(xla), grads(attn.reference_attention), 1e-5)


# ----------------------------------------------------------------------------------------------------------
# "cudnn"
# ----------------------------------------------------------------------------------------------------------

CUDNN_CASES = {  # name: (causal, layouts): text rows are causal, vision rows (packed images, padding) are not
    "text_causal": (True, TEXT_LAYOUTS),
    "vision_full": (False, LAYOUTS),
}


@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_logic_with_xla_inside(case):
    """The roll / mask logic of the cudnn path, with XLA's attention in cuDNN's place (runs on CPU)."""
    causal, layouts = CUDNN_CASES[case]
    q, k, v, seg, g = make_inputs(40, 4, 2, 16, layouts=layouts)
    cudnn_xla = functools.partial(attn.cudnn_attention, inner_implementation="xla")
    got = value_and_grads(cudnn_xla, q, k, v, seg, g, causal=causal)
    assert_close(got, reference(40, 4, 2, 16, causal=causal, layouts=layouts), F32_TOL)


def test_cudnn_causal_rejects_packed_rows_loudly():
    """Causal rows that are not one run of one id (packed sequences) come out NaN; the other rows are exact."""
    q, k, v, seg, _ = make_inputs(40, 4, 2, 16, layouts=("both", "packed"))
    out = jax.jit(functools.partial(attn.cudnn_attention, causal=True, inner_implementation="xla"))(q, k, v, seg)
    assert np.isnan(np.asarray(out[1])).all()
    assert_close(out[0], attn.reference_attention(q, k, v, seg, causal=True)[0], F32_TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs only on an NVIDIA GPU")
@pytest.mark.parametrize(
    "causal,heads,kv_heads,d,t,layouts",
    [(True, 16, 2, 128, 300, TEXT_LAYOUTS), (False, 16, 16, 80, 200, LAYOUTS), (False, 16, 16, 80, 64, LAYOUTS)],
    ids=["text_3b", "vision_full", "vision_window"],
)
def test_cudnn_matches_reference_on_gpu(causal, heads, kv_heads, d, t, layouts):
    q, k, v, seg, g = make_inputs(t, heads, kv_heads, d, layouts=layouts, dtype=jnp.bfloat16)
    assert attn.resolve_implementation("auto", dtype=q.dtype, head_dim=d) == "cudnn"
    got = value_and_grads(functools.partial(attn.attention, implementation="cudnn"), q, k, v, seg, g, causal=causal)
    want = value_and_grads(attn.reference_attention, q, k, v, seg, g, causal=causal)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):  # bf16 gradients reach O(10)
        assert_close_at_scale(a, b, 2e-2)


# ----------------------------------------------------------------------------------------------------------
# "splash"
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_splash_interpret_matches_reference_under_a_mesh():
    """Causal GQA through the Pallas interpreter, run per device under shard_map on a CPU mesh (batch over
    data x fsdp, heads over tensor); T = 200 is padded to 256 (2 kernel blocks of 128)."""
    layouts = ("both", "packed", "left", "empty")
    q, k, v, seg, g = make_inputs(200, 4, 2, 16, layouts=layouts)
    mesh = sharding.make_mesh((2, 2, 2), jax.devices("cpu")[:8])
    on_mesh = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
    q, k, v, seg, g = jax.device_put((q, k, v, seg, g), on_mesh)

    def splash(q, k, v, seg, causal):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return attn.splash_attention(q, k, v, seg, causal=causal, interpret=True)

    got = value_and_grads(splash, q, k, v, seg, g, causal=True)
    assert_close(got, reference(200, 4, 2, 16, causal=True, layouts=layouts), F32_TOL)


@pytest.mark.slow
def test_splash_interpret_vision_head_dim_80():
    """Non-causal packed segments with the vision head dim (80, not a multiple of 128) and a 64-long window."""
    q, k, v, seg, g = make_inputs(64, 2, 2, 80)
    splash = functools.partial(attn.splash_attention, interpret=True)
    got = value_and_grads(splash, q, k, v, seg, g, causal=False)
    assert_close(got, value_and_grads(attn.reference_attention, q, k, v, seg, g, causal=False), F32_TOL)


@pytest.fixture(scope="module")
def tpu_mesh():
    """A (1, 8, 1) ("data", "fsdp", "tensor") mesh over a v5p:2x2x2 topology, compiled for by libtpu (no TPU)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed: the TPU lowering test needs it (pip install -e '.[test]')")
    # libtpu only compiles here: let it load next to other processes holding it (it otherwise takes
    # /tmp/libtpu_lockfile), and tell it this is one host so that it does not look for TPU workers.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5p:2x2x2", platform="tpu")
    return topologies.make_mesh(topo, (1, 8, 1), ("data", "fsdp", "tensor"))


@pytest.mark.slow
def test_splash_compiles_for_tpu(tpu_mesh):
    """Forward and backward of the splash path compile for TPU under the model's mesh, through
    `attention(implementation="auto")`: 3B text (bf16, B=8, T=512, H=16, K=2, D=128, causal) and 3B vision (16
    heads of 80, non-causal) on 64-long windows and a 1024-long full-attention slot. One program, one compile."""
    shapes = {  # name: (B, T, H, K, D, causal)
        "text": (8, 512, 16, 2, 128, True),
        "vision_window": (64, 64, 16, 16, 80, False),
        "vision_full": (8, 1024, 16, 16, 80, False),
    }

    def loss(qkv, segs):
        with jax.sharding.use_abstract_mesh(tpu_mesh.abstract_mesh):
            assert attn.resolve_implementation("auto", dtype=jnp.bfloat16, head_dim=128) == "splash"
            total = 0.0
            for name, (q, k, v) in qkv.items():
                out = attn.attention(q, k, v, segs[name], causal=shapes[name][5])
                total += jnp.vdot(out.astype(jnp.float32), jnp.cos(q.astype(jnp.float32)))
            return total

    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    qkv = {n: (bf16(b, t, h, d), bf16(b, t, kv, d), bf16(b, t, kv, d)) for n, (b, t, h, kv, d, _) in shapes.items()}
    segs = {name: jax.ShapeDtypeStruct((b, t), jnp.int32) for name, (b, t, *_) in shapes.items()}
    batch = jax.sharding.NamedSharding(tpu_mesh, jax.P(("data", "fsdp")))
    in_shardings = jax.tree.map(lambda _: batch, (qkv, segs))
    compiled = jax.jit(jax.value_and_grad(loss), in_shardings=in_shardings).lower(qkv, segs).compile()
    hlo = compiled.as_text()
    # fwd, dq and dkv kernels per shape, each on one device's rows (the batch is split 8 ways).
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3 * len(shapes)
    assert "bf16[1,512,16,128]" in hlo and "bf16[8,64,16,80]" in hlo and "bf16[1,1024,16,80]" in hlo


# ----------------------------------------------------------------------------------------------------------
# Choice of implementation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "platform,dtype,head_dim,want",
    [
        ("cpu", jnp.bfloat16, 128, "xla"),
        ("tpu", jnp.float32, 80, "splash"),
        ("gpu", jnp.bfloat16, 128, "cudnn"),
        ("gpu", jnp.float16, 80, "cudnn"),
        ("gpu", jnp.float32, 128, "xla"),
        ("gpu", jnp.bfloat16, 256, "xla"),
        ("gpu", jnp.bfloat16, 60, "xla"),
    ],
)
def test_auto_choice(platform, dtype, head_dim, want):
    assert attn.resolve_implementation("auto", dtype=dtype, head_dim=head_dim, platform=platform) == want


def test_auto_defaults_to_this_backend():
    """Without a mesh in context, the platform is JAX's default backend (the TPU lowering test covers a mesh)."""
    want = "splash" if jax.default_backend() == "tpu" else "xla"  # float32 is never cuDNN's
    assert attn.resolve_implementation("auto", dtype=jnp.float32, head_dim=64) == want


@pytest.mark.parametrize(
    "implementation,platform,dtype,head_dim,message",
    [
        ("cudnn", "cpu", jnp.bfloat16, 128, "needs an NVIDIA GPU"),
        ("cudnn", "gpu", jnp.float32, 128, "bfloat16 or float16"),
        ("cudnn", "gpu", jnp.bfloat16, 256, "head dim"),
        ("splash", "cpu", jnp.bfloat16, 128, "needs a TPU"),
        ("splash", "gpu", jnp.bfloat16, 128, "needs a TPU"),
        ("flash", "cpu", jnp.float32, 64, "must be one of"),
    ],
)
def test_explicit_choice_errors(implementation, platform, dtype, head_dim, message):
    with pytest.raises(ValueError, match=message):
        attn.resolve_implementation(implementation, dtype=dtype, head_dim=head_dim, platform=platform)


@pytest.mark.parametrize("implementation", ["xla", "cudnn", "splash"])
def test_explicit_choice_passes_through(implementation):
    platform = {"xla": "cpu", "cudnn": "gpu", "splash": "tpu"}[implementation]
    chosen = attn.resolve_implementation(implementation, dtype=jnp.bfloat16, head_dim=80, platform=platform)
    assert chosen == implementation
