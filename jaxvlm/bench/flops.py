"""Model FLOPs of a Qwen2.5-VL / Qwen3-VL training step, and the decode bandwidth roofline, from the config alone.

Two counts, both for one forward + backward over a batch (training = 3 x the forward's matmul FLOPs):

* `train_flops`: what the step computes — the decoder's matmuls (attention projections, SwiGLU MLP, LM head on the
  scored positions), attention scores and values over the full S x S square (verl's convention; the causal half is
  not subtracted), and the vision tower when the batch has images (patch embedding, blocks with their window / full
  attention, patch merger; Qwen3-VL: a two-matrix MLP, full attention in every block, and one more merger per
  DeepStack layer). Embedding lookups (Qwen3-VL's interpolated position table too) and elementwise work are not
  counted (PaLM's MFU convention).
* `lora_train_flops`: the same with LoRA adapters on a frozen base: no weight gradients of the base's matmuls, the
  adapters' own matmuls counted, the vision tower's forward alone when it holds no adapter.
* `verl_lm_flops`: verl's / EasyR1's `FlopsCounter` for Qwen2 (`_estimate_qwen2_flops`), language model only:
  6 x (per-layer matmul params x layers + 2 x vocab x hidden) x tokens + 12 x sum(S^2) x head_dim x heads x layers.
  It counts the embedding as a matmul and ignores the vision tower; this is what their "MFU" divides. Their
  Qwen3-VL count (`_estimate_qwen3_vl_flops`) is the same formula for the language model.

`decode_roofline` is the memory-bandwidth ceiling of one decode step: every step reads the decoder
weights once and each row's KV cache; tokens/s <= B x bandwidth / bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxvlm.models.config import ModelConfig, Qwen3VisionConfig, TextConfig, VisionConfig


def _layer_matmul_params(text: TextConfig) -> int:
    """Matmul weights of one decoder layer: q, k, v, o projections and the gate / up / down MLP."""
    hd = text.resolved_head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    return text.hidden_size * (q + 2 * kv) + q * text.hidden_size + 3 * text.hidden_size * text.intermediate_size


def _lm_forward_parts(text: TextConfig, seq_lens: Sequence[int], scored_tokens: int) -> tuple[float, float, float]:
    """Forward FLOPs of the decoder: (the layers' projections and MLPs, the LM head, attention's QK^T and AV)."""
    tokens = int(np.sum(seq_lens))
    hd = text.resolved_head_dim
    dense = 2 * _layer_matmul_params(text) * text.num_hidden_layers * tokens
    head = 2 * text.hidden_size * text.vocab_size * scored_tokens
    square = float(np.sum(np.square(np.asarray(seq_lens, np.float64))))
    attention = 4 * square * hd * text.num_attention_heads * text.num_hidden_layers  # QK^T and AV
    return float(dense), float(head), float(attention)


def lm_forward_flops(text: TextConfig, seq_lens: Sequence[int], scored_tokens: int) -> float:
    """Forward FLOPs of the decoder over rows of `seq_lens` tokens, with the LM head on `scored_tokens` positions."""
    return float(sum(_lm_forward_parts(text, seq_lens, scored_tokens)))


def _vision_segments(grid: Sequence[int], vision: VisionConfig) -> tuple[list[int], list[int]]:
    """Attention segment lengths (in patches) of one image [t, h, w]: (windowed blocks, full-attention blocks).

    Full-attention blocks attend within each frame (h x w patches); windowed blocks within windows of
    `window_merged` x `window_merged` merged tokens (edge windows smaller), as transformers' `get_window_index`."""
    t, h, w = (int(x) for x in grid)
    m = vision.spatial_merge_size
    mh, mw, win = h // m, w // m, vision.window_merged
    rows = [min(win, mh - i) for i in range(0, mh, win)]
    cols = [min(win, mw - j) for j in range(0, mw, win)]
    windows = [r * c * m * m for r in rows for c in cols] * t
    return windows, [h * w] * t


def vision_forward_flops(vision: VisionConfig | Qwen3VisionConfig, grids: np.ndarray) -> float:
    """Forward FLOPs of the vision tower over images `grids` [n, 3] (t, h, w in patches)."""
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    if not len(grids):
        return 0.0
    patches = int(np.prod(grids, axis=1).sum())
    h, i, hd = vision.hidden_size, vision.intermediate_size, vision.head_dim
    qwen3 = isinstance(vision, Qwen3VisionConfig)
    mlp_matrices = 2 if qwen3 else 3  # Qwen3-VL: linear_fc2(gelu(linear_fc1 x)); Qwen2.5-VL: SwiGLU
    per_block = 2 * patches * (4 * h * h + mlp_matrices * h * i)  # qkv + proj, MLP
    windows, frames = [], []
    for g in grids:
        w, f = _vision_segments(g, vision)
        windows += w
        frames += f
    full = set(vision.fullatt_block_indexes)
    attention = 0.0
    for block in range(vision.depth):
        segments = frames if block in full else windows
        attention += 4 * float(np.sum(np.square(np.asarray(segments, np.float64)))) * hd * vision.num_heads
    embed = 2 * patches * vision.patch_dim * h
    merged = patches // vision.merge_unit
    merger = 2 * merged * (vision.merge_unit * h) * (vision.merge_unit * h + vision.out_hidden_size)
    mergers = 1 + (len(vision.deepstack_visual_indexes) if qwen3 else 0)  # the main one + one per DeepStack layer
    return float(vision.depth * per_block + attention + embed + mergers * merger)


def train_flops(
    cfg: ModelConfig,
    seq_lens: Sequence[int],
    scored_tokens: int,
    grids: np.ndarray | None = None,
    vision_trained: bool = True,
) -> dict[str, float]:
    """FLOPs of one training step (forward + backward) over a batch: {"total", "lm", "vision"}.

    seq_lens: tokens per row (prompt + completion, images' placeholder tokens included); scored_tokens: positions
    the LM head runs on (the completion tokens); grids: the batch's images [n, 3]. A frozen vision tower
    (`vision_trained=False`) costs one forward only (no gradient flows into it).
    """
    lm = 3 * lm_forward_flops(cfg.text, seq_lens, scored_tokens)
    vision = 0.0
    if grids is not None and cfg.vision is not None:
        vision = (3 if vision_trained else 1) * vision_forward_flops(cfg.vision, grids)
    return {"total": lm + vision, "lm": lm, "vision": vision}


def lora_train_flops(
    cfg: ModelConfig, params, seq_lens: Sequence[int], scored_tokens: int, grids: np.ndarray | None = None
) -> dict[str, float]:
    """FLOPs of one LoRA training step (forward + backward, the base frozen) over a batch: {"total", "lm", "vision",
    "adapters"}, where `params` (arrays or abstract) hold the adapters (`jaxvlm.models.lora`).

    No weight gradient of a frozen matmul is formed, so the decoder's projections, MLPs and LM head cost their forward
    and the input gradient (2 x forward; every layer's, as the gradient reaches the lowest adapted layer through the
    layer scan), attention's QK^T / AV 3 x (its backward is two matmuls per forward one, as in full training), and
    each adapter x A B 3 x its forward (both factors' gradients and its input's). The vision tower costs its forward
    alone when it holds no adapter (no gradient flows into it); with adapters there it is counted as fully trained
    (3 x, its adapters' own matmuls not counted: an estimate). Rematerialisation is not counted (model FLOPs)."""
    from jaxvlm.models import lora

    dense, head, attention = _lm_forward_parts(cfg.text, seq_lens, scored_tokens)
    tokens = int(np.sum(seq_lens))
    adapters, vision_adapted = 0.0, False
    flat = _flat(lora.adapters_of(params))
    for path, a in flat.items():
        if path[-1] != "lora_a":
            continue
        if path[0] != "language_model":
            vision_adapted = True
            continue
        b = flat[(*path[:-1], "lora_b")]
        layers = math.prod(a.shape[:-2])
        fan_in, rank, fan_out = a.shape[-2], a.shape[-1], b.shape[-1]
        adapters += 2.0 * tokens * rank * (fan_in + fan_out) * layers
    lm = 2 * (dense + head) + 3 * attention + 3 * adapters
    vision = 0.0
    if grids is not None and cfg.vision is not None:
        vision = (3 if vision_adapted else 1) * vision_forward_flops(cfg.vision, grids)
    return {"total": lm + vision, "lm": lm, "vision": vision, "adapters": 3 * adapters}


def _flat(tree) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree) if tree else {}


def verl_lm_flops(text: TextConfig, seq_lens: Sequence[int]) -> float:
    """verl's / EasyR1's Qwen2 FLOPs estimate for a training step over rows of `seq_lens` tokens (LM only).

    Their `head_dim` is hidden // heads (the same for every Qwen2.5 size)."""
    head_dim = text.hidden_size // text.num_attention_heads
    q = text.num_attention_heads * head_dim
    kv = text.num_key_value_heads * head_dim
    mlp = text.hidden_size * text.intermediate_size * 3
    attn_linear = text.hidden_size * (q + 2 * kv + text.num_attention_heads * head_dim)
    dense = (mlp + attn_linear) * text.num_hidden_layers + text.vocab_size * text.hidden_size * 2
    square = float(np.sum(np.square(np.asarray(seq_lens, np.float64))))
    return float(
        6 * dense * int(np.sum(seq_lens)) + 12 * square * head_dim * text.num_attention_heads * text.num_hidden_layers
    )


def decoder_weight_bytes(cfg: ModelConfig, bytes_per_param: int) -> int:
    """Bytes of the weights one decode step reads: the decoder layers, final norm and LM head (the embedding table
    only through the LM head when tied; an untied table is read one row per token, not counted)."""
    t = cfg.text
    per_layer = _layer_matmul_params(t) + t.resolved_head_dim * (t.num_attention_heads + 2 * t.num_key_value_heads)
    per_layer += 2 * t.hidden_size  # the two RMSNorm scales
    return int((per_layer * t.num_hidden_layers + t.hidden_size + t.vocab_size * t.hidden_size) * bytes_per_param)


def kv_bytes_per_token(text: TextConfig, bytes_per_value: int) -> int:
    """KV-cache bytes of one token over all layers (36,864 for Qwen2.5-VL-3B in bf16)."""
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.resolved_head_dim * bytes_per_value


def decode_roofline(
    cfg: ModelConfig, batch: int, mean_context: float, bandwidth: float, bytes_per_param: int, bytes_per_kv: int
) -> dict[str, float]:
    """Bandwidth ceiling of decoding: steps/s <= bandwidth / (weights + batch x mean_context x kv bytes)."""
    weights = decoder_weight_bytes(cfg, bytes_per_param)
    kv = batch * mean_context * kv_bytes_per_token(cfg.text, bytes_per_kv)
    steps = bandwidth / (weights + kv)
    return {"bytes_per_step": float(weights + kv), "steps_per_s": steps, "tokens_per_s": batch * steps}


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (nan when either is unknown)."""
    if not seconds or not peak or math.isnan(peak):
        return float("nan")
    return flops / seconds / peak


class DynamicLoopError(ValueError):
    """A while loop whose trip count is data-dependent: its matmuls cannot be counted from the jaxpr."""


def traced_matmul_flops(fn, *args, dead_code: bool = True, **kwargs) -> float:
    """2 x multiply-adds of every `dot_general` that `fn(*args)` executes, read from its jaxpr (scan bodies counted
    `length` times, nested calls and remat followed). An independent check of the analytic counts above, and a way
    to count a model variant they do not describe. Loops with a data-dependent trip count (while) are refused; a
    `cond` counts its costliest branch (an upper bound: the vision tower chooses window or full attention per
    block with one).

    `dead_code=False` first drops what no output reads, as XLA does when it compiles: a gradient's jaxpr holds the
    custom VJPs' whole backward (the fused layers' kernel gradients too, which a LoRA step discards: XLA never
    computes them). Uses JAX's internal `dce_jaxpr`."""
    import jax
    from jax.extend import core as jax_core

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
                total += 2.0 * float(np.prod(lhs)) * float(np.prod(rhs_free))
                continue
            if name == "while":
                raise DynamicLoopError("traced_matmul_flops: a while loop's trip count is not static")
            if name == "cond":
                total += max(count(branch.jaxpr) for branch in eqn.params["branches"])
                continue
            factor = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in jax_core.jaxprs_in_params(eqn.params):
                total += factor * count(sub)
        return total

    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    if not dead_code:
        from jax._src.interpreters import partial_eval as pe

        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return count(jaxpr)
