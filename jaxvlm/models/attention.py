"""Self-attention with grouped-query heads and segment ids: one function, several kernels behind it.

`attention(q, k, v, segment_ids, causal=..., implementation=...)` is the entry point the model calls. Segment ids
express every mask the model needs (0 = padding; a query attends only keys of its own nonzero segment, and with
`causal` only keys at or before it; padding queries output exactly 0): text is causal with segment ids = the
attention mask (padding at both ends of a row), vision windows and full-attention slots are non-causal with one id
per image and 0 on padding.

Implementations (`resolve_implementation` picks one for "auto" and checks explicit choices):

* "xla": memory-efficient attention in plain JAX, for CPU and as the fallback everywhere. FlashAttention-2 style:
  query blocks x key blocks with an online float32 softmax; a `jax.custom_vjp` whose forward keeps only the
  output and the float32 log-sum-exp, and whose backward recomputes each block's scores (dq, dk, dv per block,
  D_i = rowsum(dO * O)). Causal attention never computes key blocks above the diagonal (each query block loops
  over key blocks 0..i only). GQA is native: the G query heads of a kv head are rows of one matmul, k/v are never
  repeated. T <= one block (256) is one dense block, without loops. Works under jit, vmap, checkpoint/remat and
  scan. Limits: the blocks run one after another as separate XLA ops (no fused kernel), so on GPU/TPU it is a
  fallback, not a fast path; T is padded up to the block grid (at most 8 x n positions of waste).
* "cudnn": cuDNN flash attention via `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only, bf16/fp16,
  head dim a multiple of 8 and at most 128. Causal rows are rolled so that their real tokens start at 0 and use
  cuDNN's fused PADDING_CAUSAL mask (nothing T x T in memory); non-causal rows get an explicit [B, 1, T, T] mask.
  Limits: a causal row must be one contiguous run of one nonzero id (the text layout; a packed causal row comes
  out NaN rather than wrong); the non-causal mask is a bias in memory, with a bias gradient cuDNN computes and
  throws away, and lengths padded to a multiple of 64. See `cudnn_attention`.
* "splash": the Pallas TPU splash-attention kernel (`make_splash_mqa`, one call per batch row and kv head, vmapped),
  under `jax.shard_map` when a mesh is in context (batch over ("data", "fsdp"), heads over "tensor", an axis
  dropped when it does not divide). Lengths are padded to a multiple of 128 (the kernel's blocks are multiples of
  128 lanes; padding is segment 0, exact), so a 64-long vision window does twice the work it needs. Head dims are
  taken as they are (16, 64, 80, 128 compile: a block spans the whole head dim). The kernel does not scale: q is
  scaled by D**-0.5 before it, in q's dtype (one bf16 rounding). The sequence axis is never sharded.

`reference_attention` materialises the dense float32 scores: the ground truth of the tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")

# Largest query/key block of the "xla" path, and the length up to which it is one dense block. Measured on a
# quiet 2-core CPU (causal forward + backward, float32, jit; B=4, H=12, K=4, D=64): 256 vs 128 vs 512 take 109 /
# 107 / 143 ms at T=512, 265 / 352 ms at T=1024, 932 / 1173 ms at T=2048 (512: ~1.5x slower), 3.8 / 4.4 s at
# T=4096; for the vision's 16 heads of 80 (B=2, T=1024) 270 / 348 ms.
XLA_BLOCK = 256


def attention(q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool, implementation: str = "auto") -> Array:
    """Self-attention with grouped-query heads.

    q [B, T, H, D]; k, v [B, T, K, D] with H a multiple of K (query head h reads kv head h // (H // K));
    segment_ids int32 [B, T]: 0 marks padding; a query attends only keys of its own nonzero segment id, and with
    causal=True only keys at index <= its own index. Rows (queries) with segment 0 output exactly 0.
    Scale D**-0.5; scores, softmax and accumulation in float32; output in q.dtype.
    """
    impl = resolve_implementation(implementation, dtype=q.dtype, head_dim=q.shape[-1])
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, causal=causal)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, causal=causal)
    return splash_attention(q, k, v, segment_ids, causal=causal)


def reference_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool) -> Array:
    """Dense materialised [B, K, H/K, T, T] float32 scores: the ground truth for tests (same semantics)."""
    _check_shapes(q, k, v, segment_ids)
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * (d**-0.5)
    mask = _segment_mask(segment_ids, segment_ids, jnp.arange(t), jnp.arange(t), causal)  # [B, T, T]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    top = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    probs = jnp.exp(scores - jnp.where(jnp.isneginf(top), 0.0, top))
    total = probs.sum(axis=-1, keepdims=True)
    probs = probs / jnp.where(total == 0, 1.0, total)  # a query with no key (padding) gets all-zero weights
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def resolve_implementation(implementation: str, *, dtype, head_dim: int, platform: str | None = None) -> str:
    """'auto' -> 'splash' on TPU, 'cudnn' on GPU when dtype is bf16/fp16 and head_dim is supported, else 'xla'.
    Explicit choices are checked: a clear ValueError if e.g. 'cudnn' is asked for on a CPU or with float32.

    `platform` defaults to that of the mesh in context (so ahead-of-time compilation for a TPU topology from a CPU
    host resolves to TPU), else to `jax.default_backend()`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    platform = platform or _current_platform()
    cudnn_problem = _cudnn_problem(dtype, head_dim, platform)
    if implementation == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if cudnn_problem is None else "xla"
    if implementation == "cudnn" and cudnn_problem is not None:
        raise ValueError(f"attention implementation 'cudnn' is not available: {cudnn_problem}")
    if implementation == "splash" and platform != "tpu":
        raise ValueError(f"attention implementation 'splash' needs a TPU, but the platform is {platform!r}")
    return implementation


def _current_platform() -> str:
    """Platform of the mesh in context (its abstract device), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _cudnn_problem(dtype, head_dim: int, platform: str) -> str | None:
    """Why cuDNN flash attention cannot run these inputs, or None when it can."""
    if platform not in ("gpu", "cuda"):
        return f"it needs an NVIDIA GPU, but the platform is {platform!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"it takes bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 128:
        return f"it takes a head dim that is a multiple of 8 and at most 128, got {head_dim}"
    return None


def _check_shapes(q: Array, k: Array, v: Array, segment_ids: Array) -> None:
    """Raise a ValueError unless q [B, T, H, D], k = v [B, T, K, D] with K | H, and segment_ids [B, T]."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, T, K, D], got {q.shape}, {k.shape}, {v.shape}")
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"k, v {k.shape} do not fit q {q.shape} (same B, T, D; H a multiple of K)")
    if segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")


def _segment_mask(seg_q: Array, seg_k: Array, pos_q: Array, pos_k: Array, causal: bool) -> Array:
    """bool [B, Tq, Tk]: same nonzero segment (and key position <= query position when causal).

    seg_q [B, Tq], seg_k [B, Tk] segment ids; pos_q [Tq], pos_k [Tk] absolute positions.
    """
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q != 0)[:, :, None]
    if causal:
        mask &= pos_k[None, None, :] <= pos_q[None, :, None]
    return mask


# ----------------------------------------------------------------------------------------------------------
# "xla": blockwise attention with an online softmax and a recomputing backward
# ----------------------------------------------------------------------------------------------------------


def xla_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool, block_size: int = XLA_BLOCK
) -> Array:
    """Memory-efficient attention in plain JAX (same contract as `attention`).

    T is cut into n equal blocks of at most `block_size` (rounded up to a multiple of 8; the tail is padded with
    segment 0, which is exact); T <= `block_size` is one dense block.
    """
    _check_shapes(q, k, v, segment_ids)
    t = q.shape[1]
    n = -(-t // block_size)
    block = t if n == 1 else _round_up(-(-t // n), 8)
    return _flash(q, k, v, segment_ids.astype(jnp.int32), causal, block)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_time(x: Array, length: int) -> Array:
    """Zero-pad axis 1 (time) of x [B, T, ...] to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _dot(spec: str, a: Array, b: Array) -> Array:
    """einsum with float32 accumulation and result."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _q_to_blocks(x: Array, kv_heads: int, block: int) -> Array:
    """[B, T, H, ...] (T a multiple of block) -> [n, B, K, block * G, ...]. Row r of a block is position r // G
    and query head r % G of the kv head's group, so one matmul serves all G heads that share a kv head."""
    b, t, h, *rest = x.shape
    n, g = t // block, h // kv_heads
    x = x.reshape(b, n, block, kv_heads, g, *rest).swapaxes(0, 1).swapaxes(2, 3)
    return x.reshape(n, b, kv_heads, block * g, *rest)


def _q_from_blocks(x: Array, heads: int) -> Array:
    """Inverse of `_q_to_blocks`: [n, B, K, block * G, D] -> [B, n * block, H, D]."""
    n, b, kv_heads, rows, d = x.shape
    g = heads // kv_heads
    x = x.reshape(n, b, kv_heads, rows // g, g, d).swapaxes(2, 3).swapaxes(0, 1)
    return x.reshape(b, n * (rows // g), heads, d)


def _kv_to_blocks(x: Array, block: int) -> Array:
    """[B, T, K, D] -> [n, B, K, block, D]."""
    b, t, kv_heads, d = x.shape
    return x.reshape(b, t // block, block, kv_heads, d).transpose(1, 0, 3, 2, 4)


def _kv_from_blocks(x: Array) -> Array:
    """Inverse of `_kv_to_blocks`: [n, B, K, block, D] -> [B, n * block, K, D]."""
    n, b, kv_heads, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, n * block, kv_heads, d)


class _Blocks:
    """Inputs of `_flash` cut into n blocks of `block` positions (T padded with segment 0):
    q [n, B, K, block*G, D] (see `_q_to_blocks`), k, v [n, B, K, block, D], seg [n, B, block]."""

    def __init__(self, q: Array, k: Array, v: Array, segment_ids: Array, block: int):
        b, t, h, d = q.shape
        self.t, self.heads, self.kv_heads, self.block = t, h, k.shape[2], block
        self.groups = h // self.kv_heads
        self.scale = d**-0.5
        self.n = -(-t // block)
        self.padded = self.n * block
        self.q = _q_to_blocks(_pad_time(q, self.padded), self.kv_heads, block)
        self.k = _kv_to_blocks(_pad_time(k, self.padded), block)
        self.v = _kv_to_blocks(_pad_time(v, self.padded), block)
        self.seg = _pad_time(segment_ids, self.padded).reshape(b, self.n, block).swapaxes(0, 1)

    def rows(self, x: Array) -> Array:
        """Per-query values [B, T, H] -> [n, B, K, block*G], in the row order of the q blocks."""
        return _q_to_blocks(_pad_time(x, self.padded), self.kv_heads, self.block)

    def key_blocks(self, i, causal: bool):
        """Query block i reads key blocks [0, key_blocks): up to the diagonal when causal, all otherwise."""
        return i + 1 if causal else self.n

    def scores(self, q_i: Array, i, j, causal: bool) -> Array:
        """float32 scaled scores [B, K, block*G, block] of query block i (rows q_i) against key block j, -inf
        where the mask is false."""
        s = _dot("bkrd,bksd->bkrs", q_i, self.k[j]) * self.scale
        pos = jnp.arange(self.block)
        mask = _segment_mask(self.seg[i], self.seg[j], i * self.block + pos, j * self.block + pos, causal)
        b, kv_heads, rows, cols = s.shape
        s = jnp.where(mask[:, None, :, None, :], s.reshape(b, kv_heads, self.block, self.groups, cols), -jnp.inf)
        return s.reshape(b, kv_heads, rows, cols)


def _loop(blocks: _Blocks, stop, body, state):
    """`state = body(j, state)` for key blocks j in [0, stop); a single block is called directly (no loop)."""
    if blocks.n == 1:
        return body(0, state)
    return jax.lax.fori_loop(0, stop, body, state)


def _flash_forward(blocks: _Blocks, causal: bool) -> tuple[Array, Array]:
    """Online-softmax forward -> out [n, B, K, block*G, D] float32 and the log-sum-exp lse [n, B, K, block*G]
    (+inf on rows that attend no key, so that exp(s - lse) = 0 there in the backward)."""

    def query_block(i, q_i):
        def step(j, state):
            top, total, acc = state  # running max, running sum of exp(s - top), running sum of exp(s - top) v
            s = blocks.scores(q_i, i, j, causal)
            new_top = jnp.maximum(top, s.max(axis=-1))
            shift = jnp.where(jnp.isneginf(new_top), 0.0, new_top)  # no key yet: exp(-inf - 0) = 0, never NaN
            p = jnp.exp(s - shift[..., None])
            alpha = jnp.exp(top - shift)
            acc = alpha[..., None] * acc + _dot("bkrs,bksd->bkrd", p.astype(blocks.v.dtype), blocks.v[j])
            return new_top, alpha * total + p.sum(axis=-1), acc

        rows = q_i.shape[:-1]
        f32 = jnp.float32
        init = (jnp.full(rows, -jnp.inf, f32), jnp.zeros(rows, f32), jnp.zeros(q_i.shape, f32))
        top, total, acc = _loop(blocks, blocks.key_blocks(i, causal), step, init)
        empty = total == 0
        safe_total = jnp.where(empty, 1.0, total)
        return acc / safe_total[..., None], jnp.where(empty, jnp.inf, top + jnp.log(safe_total))

    if blocks.n == 1:
        return jax.tree.map(lambda x: x[None], query_block(0, blocks.q[0]))
    return jax.lax.map(lambda args: query_block(*args), (jnp.arange(blocks.n), blocks.q))


def _flash_backward(blocks: _Blocks, causal: bool, do: Array, lse: Array, delta: Array):
    """FlashAttention-2 backward from the output cotangent do [n, B, K, block*G, D] (q's dtype), lse and
    delta = rowsum(dO * O) [n, B, K, block*G]: recomputes each block's probabilities p = exp(s - lse) and returns
    float32 dq [n, B, K, block*G, D], dk, dv [n, B, K, block, D] (dq and dk without the scale)."""
    dtype = blocks.q.dtype

    def query_block(i, q_i, do_i, lse_i, delta_i, dk, dv):
        def step(j, state):
            dq_i, dk, dv = state
            p = jnp.exp(blocks.scores(q_i, i, j, causal) - lse_i[..., None])
            ds = p * (_dot("bkrd,bksd->bkrs", do_i, blocks.v[j]) - delta_i[..., None])
            ds = ds.astype(dtype)
            dk = dk.at[j].add(_dot("bkrs,bkrd->bksd", ds, q_i))
            dv = dv.at[j].add(_dot("bkrs,bkrd->bksd", p.astype(dtype), do_i))
            return dq_i + _dot("bkrs,bksd->bkrd", ds, blocks.k[j]), dk, dv

        return _loop(blocks, blocks.key_blocks(i, causal), step, (jnp.zeros(q_i.shape, jnp.float32), dk, dv))

    zeros = jnp.zeros(blocks.k.shape, jnp.float32)
    if blocks.n == 1:
        dq, dk, dv = query_block(0, blocks.q[0], do[0], lse[0], delta[0], zeros, zeros)
        return dq[None], dk, dv

    def scan_step(carry, args):
        dq_i, dk, dv = query_block(*args, *carry)
        return (dk, dv), dq_i

    (dk, dv), dq = jax.lax.scan(scan_step, (zeros, zeros), (jnp.arange(blocks.n), blocks.q, do, lse, delta))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool, block: int) -> Array:
    """Blockwise attention [B, T, H, D] (see `xla_attention`); the VJP keeps only out and lse."""
    return _flash_fwd(q, k, v, segment_ids, causal, block)[0]


def _flash_fwd(q, k, v, segment_ids, causal, block):
    blocks = _Blocks(q, k, v, segment_ids, block)
    out, lse = _flash_forward(blocks, causal)
    out = _q_from_blocks(out, blocks.heads)[:, : blocks.t].astype(q.dtype)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(causal, block, residuals, g):
    q, k, v, segment_ids, out, lse = residuals
    blocks = _Blocks(q, k, v, segment_ids, block)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # D_i = rowsum(dO * O) [B, T, H]
    do = blocks.rows(g.astype(q.dtype))
    dq, dk, dv = _flash_backward(blocks, causal, do, lse, blocks.rows(delta))
    t, scale = blocks.t, blocks.scale
    dq = (_q_from_blocks(dq, blocks.heads)[:, :t] * scale).astype(q.dtype)
    dk = (_kv_from_blocks(dk)[:, :t] * scale).astype(k.dtype)
    dv = _kv_from_blocks(dv)[:, :t].astype(v.dtype)
    return dq, dk, dv, None  # no cotangent for the integer segment ids


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------
# "cudnn": jax.nn.dot_product_attention with cuDNN's fused masks
# ----------------------------------------------------------------------------------------------------------

# cuDNN takes a mask as an additive bias; with a bias, the backward needs even lengths (JAX's check) and, before
# cuDNN 9.5, lengths that are multiples of 64 (its bias-gradient check). Masked inputs are padded to this.
_CUDNN_MASK_MULTIPLE = 64


def cudnn_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool, inner_implementation: str = "cudnn"
) -> Array:
    """`attention` through `jax.nn.dot_product_attention(..., implementation=inner_implementation)`.

    cuDNN's fused padding mask assumes right padding, and it has no segment ids, so:

    * causal (text): each row is rolled so that its real tokens start at index 0, attended with `is_causal` and
      `query/key_value_seq_lengths` = the number of real tokens (cuDNN's PADDING_CAUSAL mask: nothing T x T in
      memory, key blocks above the diagonal skipped), then rolled back. Rolling keeps the order of the real
      tokens, so this is exact when a row's nonzero ids are one contiguous run of one id (padding at either or
      both ends): the text layout. A row that is not (packed causal sequences) comes out NaN, never silently
      wrong.
    * non-causal (vision windows, several images packed in a slot): an explicit boolean mask [B, 1, T, T] from the
      segment ids, which is the only way to express several segments per row in this API; lengths are padded to a
      multiple of 64 for cuDNN's bias backward.

    `inner_implementation="xla"` runs the same logic on any backend (the CPU tests do).
    """
    _check_shapes(q, k, v, segment_ids)
    if causal:
        return _cudnn_rolled_causal(q, k, v, segment_ids, inner_implementation)
    return _cudnn_masked(q, k, v, segment_ids, inner_implementation)


def _cudnn_rolled_causal(q: Array, k: Array, v: Array, segment_ids: Array, inner_implementation: str) -> Array:
    """Causal attention of rows whose real tokens are one contiguous run; see `cudnn_attention`."""
    real = segment_ids != 0  # [B, T]
    first, length, one_run = _single_run(segment_ids)
    # A fully padded row still gets one key, so that cuDNN never divides by an empty softmax; it is zeroed below.
    lengths = jnp.maximum(length, 1)
    out = jax.nn.dot_product_attention(
        _roll_rows(q, first),
        _roll_rows(k, first),
        _roll_rows(v, first),
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=inner_implementation,
    )
    out = jnp.where(real[:, :, None, None], _roll_rows(out, -first), 0)
    return jnp.where(one_run[:, None, None, None], out, jnp.nan).astype(q.dtype)


def _roll_rows(x: Array, shift: Array) -> Array:
    """Roll each row of x [B, T, ...] left by shift[b]: out[b, i] = x[b, (i + shift[b]) % T]."""
    t = x.shape[1]
    index = (jnp.arange(t)[None] + shift[:, None]) % t  # [B, T]
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _single_run(segment_ids: Array) -> tuple[Array, Array, Array]:
    """Per row of segment_ids [B, T]: start and length of its nonzero tokens (int32 [B]), and whether they are one
    contiguous run of one id (bool [B]; true on a fully padded row)."""
    real = segment_ids != 0
    first = jnp.argmax(real, axis=1).astype(jnp.int32)
    length = real.sum(axis=1, dtype=jnp.int32)
    pos = jnp.arange(segment_ids.shape[1])
    run = (pos >= first[:, None]) & (pos < (first + length)[:, None])
    first_id = jnp.take_along_axis(segment_ids, first[:, None], axis=1)
    return first, length, jnp.all((real == run) & (~real | (segment_ids == first_id)), axis=1)


def _cudnn_masked(q: Array, k: Array, v: Array, segment_ids: Array, inner_implementation: str) -> Array:
    """Non-causal attention with an explicit segment mask; see `cudnn_attention`."""
    t = q.shape[1]
    padded = _round_up(t, _CUDNN_MASK_MULTIPLE)
    q, k, v, segment_ids = (_pad_time(x, padded) for x in (q, k, v, segment_ids))
    pos = jnp.arange(padded)
    mask = _segment_mask(segment_ids, segment_ids, pos, pos, causal=False)[:, None]  # [B, 1, T, T]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=inner_implementation)
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0)[:, :t].astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# "splash": the Pallas TPU splash-attention kernel
# ----------------------------------------------------------------------------------------------------------

# The kernel's blocks are multiples of the 128 TPU lanes; lengths are padded to this.
_SPLASH_MULTIPLE = 128


def splash_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool, interpret: bool = False
) -> Array:
    """`attention` with the Pallas TPU splash kernel (`interpret=True` runs the kernel's interpreter, on any
    backend). With a mesh in context the kernel runs per device under `jax.shard_map`: batch over
    ("data", "fsdp") and heads over "tensor", each axis dropped when it does not divide its dimension."""
    _check_shapes(q, k, v, segment_ids)
    local = functools.partial(_splash_local, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    b, _, h, _ = q.shape
    batch_axes = _dividing_axes(mesh, ("data", "fsdp"), b)
    head_axes = _dividing_axes(mesh, ("tensor",), math.gcd(h, k.shape[2]))
    spec = jax.P(batch_axes or None, None, head_axes or None, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec, jax.P(batch_axes or None, None)), out_specs=spec, check_vma=False
    )(q, k, v, segment_ids)


def _dividing_axes(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The axes of `names` that the mesh has (and does not already hold manual), kept while their product divides
    `size`."""
    kept, product = [], 1
    for name in names:
        if name in mesh.axis_names and name not in mesh.manual_axes and size % (product * mesh.shape[name]) == 0:
            kept.append(name)
            product *= mesh.shape[name]
    return tuple(kept)


def _splash_local(q: Array, k: Array, v: Array, segment_ids: Array, *, causal: bool, interpret: bool) -> Array:
    """Splash attention on one device's arrays: one MQA kernel call per (batch row, kv head)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas only where splash runs

    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    padded = _round_up(t, _SPLASH_MULTIPLE)
    block = next(size for size in (512, 256, 128) if padded % size == 0)
    # The kernel does not scale the scores: scale q (in float32, then back to its dtype).
    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    q, k, v, seg = (_pad_time(x, padded) for x in (q, k, v, segment_ids.astype(jnp.int32)))
    head_mask = splash.CausalMask((padded, padded)) if causal else splash.FullMask((padded, padded))
    kernel = splash.make_splash_mqa(
        splash.MultiHeadMask([head_mask] * g),
        block_sizes=splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        ),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    qh = q.reshape(b, padded, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    per_row = lambda q, k, v, seg: kernel(q, k, v, splash.SegmentIds(q=seg, kv=seg))
    per_device = jax.vmap(jax.vmap(per_row, in_axes=(0, 0, 0, None)))
    # Mosaic rejects bf16 matmuls at "highest" precision (which e.g. the tests set globally): there, pin the kernels'
    # precision to "default" (bf16 products are exact in float32). Only then: the wrapper's custom VJP does not
    # lower inside a differentiated lax.cond (the vision tower's window / full choice).
    if q.dtype != jnp.float32 and jax.config.jax_default_matmul_precision not in (None, "default", "bfloat16"):
        per_device = _with_matmul_precision(per_device, "default")
    out = per_device(qh, kh, vh, seg)  # [B, K, G, T, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)
    # Segment-0 queries attended the segment-0 keys (the kernel needs a non-empty row): zero them.
    return jnp.where((seg != 0)[:, :, None, None], out, 0)[:, :t]


def _with_matmul_precision(fn, precision: str):
    """fn, with its forward and its backward both traced under `jax.default_matmul_precision(precision)` (a
    context around the call alone would not reach the backward, which is traced when gradients are taken)."""

    @jax.custom_vjp
    def wrapped(*args):
        with jax.default_matmul_precision(precision):
            return fn(*args)

    def fwd(*args):
        with jax.default_matmul_precision(precision):
            return jax.vjp(fn, *args)

    def bwd(vjp, g):
        with jax.default_matmul_precision(precision):
            return vjp(g)

    wrapped.defvjp(fwd, bwd)
    return wrapped
