"""Rollouts: group generation with a KV cache, compiled end to end.

    rollout = generate(model, params, batch, key, SamplingParams(num_generations=8, max_new_tokens=256))

How it runs (one `jax.jit`):
1. **Prefill once per prompt.** The vision tower and the prompt go through the model once for the B prompts;
   their keys/values become the *prompt cache* `[L, B, T, K, Dh]`. The G rollouts of a prompt share it: decode
   attention reads a prompt's keys once for its whole group (`cached_attention`), so neither the vision tower, nor
   the prompt, nor its cache is ever repeated G times.
2. **Decode** in a `lax.while_loop` over a static-shape *generation cache* `[L, B*G, N, K, Dh]` (N =
   `max_new_tokens`), written in place one column per step; the loop exits as soon as every row has stopped.
   Rows are prompt-major: row `b * G + g` is rollout g of prompt b.
3. Positions: a new token of row b sits at M-RoPE position `n_valid[b] + rope_deltas[b] + i` on all three axes
   (after an image, text positions continue from the largest image position, as in transformers).

Sampling follows transformers' order: logits / temperature, then top-k, top-p, min-p; `temperature=0` is greedy.
The returned per-token log-probs are `log_softmax(logits / temperature)` of the sampled token, before the top-k /
top-p / min-p filters (the old-policy log-probs of GRPO, computed as TRL and verl compute them); for greedy
decoding they are at temperature 1.

Stopping: a row stops at the first EOS (the model config's `eos_token_id`) or stop token id; the completion mask
covers tokens up to and including that token, later columns hold `pad_token_id`. A row that never stops is
`truncated`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvlm import checks
from jaxvlm.models import lora
from jaxvlm.models.builder import build_model
from jaxvlm.models.config import ModelConfig
from jaxvlm.models.qwen2_5_vl import Qwen25VL, compute_dtype_params
from jaxvlm.sharding import traced_on

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample: the one representation of sampling settings. Built directly, or from a config's `sampling`
    section (`from_config`), passed to `generate`, and resolved against the model (`resolve`: stop ids, pad id,
    suppressed ids) into the static form the jitted sampler closes over (hashable: one compilation per value)."""

    num_generations: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    stop_token_ids: tuple[int, ...] = ()  # ids that end a completion besides the model's EOS (with use_eos)
    use_eos: bool = True  # the model config's eos_token_id ends a completion
    pad_token_id: int | None = None  # written after a row stops (None: the config's pad id, else the first stop id)
    suppress_token_ids: tuple[int, ...] | None = None  # never sampled (None: the image / video placeholder ids)

    @classmethod
    def from_config(cls, section) -> SamplingParams:
        """From a config section (a ConfigDict or a dict) holding some of the fields; unknown keys are an error."""
        values = dict(section.items())
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}")
        for name in ("stop_token_ids", "suppress_token_ids"):
            if values.get(name) is not None:
                values[name] = tuple(int(i) for i in values[name])
        return cls(**values)

    def resolve(self, config: ModelConfig) -> SamplingParams:
        """These settings with the model's ids filled in (EOS among the stop ids, pad id, suppressed ids), checked.
        Idempotent: resolving a resolved value returns it unchanged."""
        stops = resolve_stop_ids(config, self.stop_token_ids, self.use_eos)
        pad = self.pad_token_id
        if pad is None:
            pad = config.text.pad_token_id if config.text.pad_token_id is not None else (stops or (0,))[0]
        suppress = self.suppress_token_ids
        resolved = dataclasses.replace(
            self,
            temperature=float(self.temperature),
            top_k=int(self.top_k),
            top_p=float(self.top_p),
            min_p=float(self.min_p),
            stop_token_ids=stops,
            use_eos=False,
            pad_token_id=int(pad),
            suppress_token_ids=default_suppressed_ids(config) if suppress is None else tuple(int(i) for i in suppress),
        )
        resolved.validate()
        return resolved

    def validate(self) -> None:
        """FieldError naming the first field out of range."""
        checks.check_fields(self, SAMPLING_RULES)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


SAMPLING_RULES = {
    "num_generations": checks.integer(1),
    "max_new_tokens": checks.integer(1),
    "temperature": checks.number(0),
    "top_k": checks.integer(0),
    "top_p": checks.number(0, 1, lo_open=True),
    "min_p": checks.number(0, 1, hi_open=True),
    "stop_token_ids": checks.sequence_of(checks.integer(0)),
    "use_eos": checks.boolean,
    "pad_token_id": checks.optional(checks.integer(0)),
    "suppress_token_ids": checks.optional(checks.sequence_of(checks.integer(0))),
}


class Rollout(NamedTuple):
    """Completions of B prompts x G generations, rows prompt-major (row b*G + g)."""

    tokens: Array  # int32 [B*G, N]; pad_token_id after the stop token
    mask: Array  # int32 [B*G, N]; 1 up to and including the stop token
    logprobs: Array  # float32 [B*G, N]; log softmax(logits / temperature) of the token, 0 where masked
    lengths: Array  # int32 [B*G]; number of completion tokens (= mask.sum(-1))
    truncated: Array  # bool [B*G]; True when the row hit max_new_tokens without a stop token
    steps: Array  # int32 scalar; columns actually generated (< N when every row stopped early)


# ----------------------------------------------------------------------------------------------------------
# Token selection (pure, jittable)
# ----------------------------------------------------------------------------------------------------------


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Array:
    """Set the logits of tokens outside the top-k / top-p (nucleus) / min-p sets to -inf.

    logits: float [..., V], already divided by the temperature. The filters apply in transformers' order and
    each keeps at least the most likely token:
    * top-k keeps tokens whose logit is >= the k-th largest (ties at the boundary are all kept);
    * top-p keeps the smallest set of most likely tokens whose probability reaches `top_p` (a token is kept when
      the probability mass of the tokens strictly ahead of it is < top_p);
    * min-p keeps tokens whose probability is >= min_p * (probability of the most likely token).
    """
    logits = logits.astype(jnp.float32)
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_ahead = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.sum(mass_ahead < top_p, axis=-1, keepdims=True)  # >= 1: the first token has 0 ahead
        threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    if min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), neg_inf, logits)
    return logits


def sample_tokens(key: Array, logits: Array, sp: SamplingParams) -> Array:
    """One token per row: logits float [R, V] -> int32 [R] (argmax when greedy)."""
    if sp.suppress_token_ids:
        logits = logits.at[..., jnp.asarray(sp.suppress_token_ids)].set(-jnp.inf)
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / sp.temperature
    filtered = filter_logits(scaled, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def token_logprobs(logits: Array, tokens: Array, temperature: float) -> Array:
    """log softmax(logits / temperature)[token] in float32: logits [..., V], tokens int [...] -> [...].
    temperature 0 (greedy) scores at temperature 1."""
    t = temperature if temperature > 0 else 1.0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------
# The compiled sampler
# ----------------------------------------------------------------------------------------------------------


def _constrain(x: Array, sharding: NamedSharding | None, batch_axis: int) -> Array:
    """Shard `x` along `batch_axis` over the mesh's batch axes (no-op without a mesh)."""
    if sharding is None:
        return x
    spec = [None] * x.ndim
    spec[batch_axis] = sharding.spec[0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, P(*spec)))


def generate_from_inputs(
    params: Any,
    inputs: dict[str, Any],
    key: Array,
    *,
    config: ModelConfig,
    sp: SamplingParams,
    batch_sharding: NamedSharding | None = None,
) -> Rollout:
    """The pure (jittable) sampler. `inputs` comes from `prepare_prompts`:

      input_ids int [B, T] (left-padded), attention_mask [B, T], position_ids int [3, B, T], rope_deltas int [B, 1],
      and for image prompts pixel_values [S, L, patch_dim] + vision_inputs (`jaxvlm.processing.layout_images`).
    Returns a `Rollout` with B*G rows and N = sp.max_new_tokens columns.
    """
    sp = sp.resolve(config)  # idempotent; a caller may pass unresolved settings
    model = build_model(config)
    # LoRA adapters are folded into their kernels once per call (measured faster than the low-rank branch at every
    # decode step, docs/lora.md); in bfloat16 this costs no memory beyond the cast below, which copies every weight.
    if lora.has_adapters(params):
        params = lora.merged(params, config.lora)
    # Cast once per call: the decode loop then reads the weights in the compute dtype at every step (2 bytes a
    # parameter in bf16), where the layers' own cast would convert the float32 weights again at every token.
    variables = {"params": compute_dtype_params(config, params)}
    mask = inputs["attention_mask"].astype(jnp.bool_)
    b, t = inputs["input_ids"].shape
    g, n = sp.num_generations, sp.max_new_tokens
    rows = b * g

    last_logits, (prompt_k, prompt_v) = model.apply(
        variables,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs.get("pixel_values"),
        None,
        inputs["position_ids"],
        vision_inputs=inputs.get("vision_inputs"),
        method="prefill",
    )
    num_layers, _, _, kv_heads, head_dim = prompt_k.shape
    gen_shape = (num_layers, rows, n, kv_heads, head_dim)
    cache = {
        "prompt_k": prompt_k,
        "prompt_v": prompt_v,
        "prompt_mask": mask,
        "gen_k": _constrain(jnp.zeros(gen_shape, prompt_k.dtype), batch_sharding, 1),
        "gen_v": _constrain(jnp.zeros(gen_shape, prompt_v.dtype), batch_sharding, 1),
        "step": jnp.zeros((), jnp.int32),
    }
    # Position of the first new token: one past the prompt's largest M-RoPE position.
    start = jnp.repeat(completion_start(mask, inputs["rope_deltas"]), g)
    stop_ids = jnp.asarray(sp.stop_token_ids or (-1,), jnp.int32)

    def emit(i, logits, tokens, logprobs, live, done):
        """Choose column i's token for every row from logits [R, V]."""
        token = sample_tokens(jax.random.fold_in(key, i), logits, sp)
        lp = token_logprobs(logits, token, sp.temperature)
        alive = ~done
        token = jnp.where(alive, token, sp.pad_token_id)
        tokens = tokens.at[:, i].set(token)
        logprobs = logprobs.at[:, i].set(jnp.where(alive, lp, 0.0))
        live = live.at[:, i].set(alive)
        done = done | (alive & jnp.any(token[:, None] == stop_ids, axis=-1))
        return tokens, logprobs, live, done

    tokens = _constrain(jnp.full((rows, n), sp.pad_token_id, jnp.int32), batch_sharding, 0)
    logprobs = _constrain(jnp.zeros((rows, n), jnp.float32), batch_sharding, 0)
    live = _constrain(jnp.zeros((rows, n), jnp.bool_), batch_sharding, 0)
    done = _constrain(jnp.zeros((rows,), jnp.bool_), batch_sharding, 0)
    first_logits = jnp.repeat(last_logits.astype(jnp.float32), g, axis=0)  # the group shares the prefill
    tokens, logprobs, live, done = emit(0, first_logits, tokens, logprobs, live, done)

    def cond(state):
        i, _, _, _, _, done = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, tokens, logprobs, live, done = state
        # Feed column i-1 (written to cache slot i-1), then choose column i.
        cache = {**cache, "step": i - 1}
        position = jnp.broadcast_to(start + i - 1, (3, rows))
        logits, cache = model.apply(variables, tokens[:, i - 1], position, cache, method="decode_step")
        tokens, logprobs, live, done = emit(i, logits.astype(jnp.float32), tokens, logprobs, live, done)
        return i + 1, cache, tokens, logprobs, live, done

    state = (jnp.ones((), jnp.int32), cache, tokens, logprobs, live, done)
    steps, _, tokens, logprobs, live, done = jax.lax.while_loop(cond, body, state)
    live = live.astype(jnp.int32)
    return Rollout(tokens=tokens, mask=live, logprobs=logprobs, lengths=live.sum(-1), truncated=~done, steps=steps)


def completion_start(attention_mask: Array, rope_deltas: Array) -> Array:
    """M-RoPE position of each prompt's first completion token: n_valid + rope_deltas, int32 [B]."""
    return (attention_mask.astype(jnp.int32).sum(-1) + rope_deltas.reshape(-1).astype(jnp.int32)).astype(jnp.int32)


def rollout_sequences(inputs: dict[str, Array], rollout: Rollout, num_generations: int) -> dict[str, Array]:
    """Prompt + completion as one batch for scoring (teacher forcing), with the sampler's positions.

    inputs: the prompt arrays of `prepare_prompts` (B rows); rollout: B*G rows of N tokens.
    Returns input_ids / attention_mask int32 [B*G, T+N] and position_ids int32 [3, B*G, T+N]; the logits at
    columns T-1 .. T+N-2 score the N completion tokens. Images are not repeated here (pixel inputs stay per prompt).
    """
    g = num_generations
    n = rollout.tokens.shape[1]
    prompt_ids = jnp.repeat(jnp.asarray(inputs["input_ids"], jnp.int32), g, axis=0)
    prompt_mask = jnp.repeat(jnp.asarray(inputs["attention_mask"], jnp.int32), g, axis=0)
    prompt_pos = jnp.repeat(jnp.asarray(inputs["position_ids"], jnp.int32), g, axis=1)
    start = jnp.repeat(completion_start(jnp.asarray(inputs["attention_mask"]), jnp.asarray(inputs["rope_deltas"])), g)
    completion_pos = start[:, None] + jnp.arange(n, dtype=jnp.int32)
    return {
        "input_ids": jnp.concatenate([prompt_ids, rollout.tokens], axis=1),
        "attention_mask": jnp.concatenate([prompt_mask, rollout.mask.astype(jnp.int32)], axis=1),
        "position_ids": jnp.concatenate(
            [prompt_pos, jnp.broadcast_to(completion_pos[None], (3, *completion_pos.shape))], axis=2
        ),
    }


def update_rows(inputs: dict[str, Any], rollout: Rollout, num_generations: int) -> dict[str, np.ndarray]:
    """A rollout as the rows the GRPO / DyME steps take (host numpy, B*G rows): prompt_ids / prompt_mask [R, T],
    completion_ids / completion_mask [R, N], position_ids [3, R, T+N] (`rollout_sequences`), and old_logp [R, N]
    = the sampler's log-probs. `inputs`: the prompts as `prepare_prompts` returns them; `rollout` on the host."""
    seqs = jax.tree.map(np.asarray, rollout_sequences(inputs, rollout, num_generations))
    t = inputs["input_ids"].shape[1]
    return {
        "prompt_ids": seqs["input_ids"][:, :t],
        "prompt_mask": seqs["attention_mask"][:, :t],
        "completion_ids": np.asarray(rollout.tokens),
        "completion_mask": np.asarray(rollout.mask).astype(np.int32),
        "position_ids": seqs["position_ids"],
        "old_logp": np.asarray(rollout.logprobs).astype(np.float32),
    }


@functools.cache
def compiled_sampler(batch_sharding: NamedSharding | None):
    """The sampler jitted for one placement: `fn(params, inputs, key, config=, sp=)` with explicit output shardings
    (rows over the batch axes) on a mesh, traced with that mesh in context so activations stay split by rows."""
    out_shardings = None
    if batch_sharding is not None:
        rows, repl = batch_sharding, NamedSharding(batch_sharding.mesh, P())
        out_shardings = Rollout(tokens=rows, mask=rows, logprobs=rows, lengths=rows, truncated=rows, steps=repl)
    fn = functools.partial(generate_from_inputs, batch_sharding=batch_sharding)
    fn = traced_on(fn, None if batch_sharding is None else batch_sharding.mesh)
    return jax.jit(fn, static_argnames=("config", "sp"), out_shardings=out_shardings)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


def prepare_prompts(config: ModelConfig, batch: dict[str, Any], *, slot_multiple: int = 1) -> dict[str, Any]:
    """Check a prompt batch and fill in what the compiled sampler needs (numpy, host side).

    `batch` is a `Processor` output or any dict with `input_ids` [B, T] and optionally `attention_mask`,
    `position_ids`, `rope_deltas`, `pixel_values` [N, patch_dim] + `image_grid_thw` (laid out here in image slots,
    a multiple of `slot_multiple`, the data-parallel size), or pixel_values already in the slot layout with their
    `vision_inputs` (`jaxvlm.processing.layout_images`). Prompts must be left-padded (the processor's default) so
    each row's last column is its last prompt token.
    """
    from jaxvlm.processing.rope import get_rope_index, text_position_ids
    from jaxvlm.processing.vision import layout_images

    unknown = set(batch) - {
        "input_ids",
        "attention_mask",
        "position_ids",
        "rope_deltas",
        "pixel_values",
        "image_grid_thw",
        "vision_inputs",
        "mm_token_type_ids",
    }
    if unknown:
        raise TypeError(f"unexpected prompt batch keys: {sorted(unknown)}")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length > 0, got shape {ids.shape}")
    ids = ids.astype(np.int32)
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    bad = np.flatnonzero((mask[:, -1] == 0) | np.any(np.diff(mask, axis=1) < 0, axis=1))
    if bad.size:
        raise ValueError(
            f"prompt rows {bad.tolist()} are not left-padded (padding must come first and the last column must be "
            "a real token); use Processor(...)(..., padding_side='left')"
        )
    pixel_values = batch.get("pixel_values")
    grid = batch.get("image_grid_thw")
    if pixel_values is not None and config.vision is None:
        raise ValueError(
            f"this is a text-only model (model_type={config.model_type!r}): prompts cannot carry pixel_values"
        )
    if pixel_values is not None and grid is None and batch.get("vision_inputs") is None:
        raise ValueError("pixel_values needs image_grid_thw (or precomputed vision_inputs)")
    position_ids, rope_deltas = batch.get("position_ids"), batch.get("rope_deltas")
    if position_ids is None and pixel_values is not None and grid is None:
        raise ValueError("image prompts need image_grid_thw or precomputed M-RoPE position_ids")
    if position_ids is None:
        if grid is not None:
            position_ids, rope_deltas = get_rope_index(
                ids,
                mask,
                np.asarray(grid),
                image_token_id=config.image_token_id,
                spatial_merge_size=config.vision.spatial_merge_size,
            )
        else:
            position_ids = np.broadcast_to(text_position_ids(mask)[None], (3, *ids.shape))
    position_ids = np.asarray(position_ids, np.int32)
    if position_ids.ndim == 2:
        position_ids = np.broadcast_to(position_ids[None], (3, *ids.shape))
    if position_ids.shape != (3, *ids.shape):
        raise ValueError(f"position_ids must be [3, B, T] = {(3, *ids.shape)}, got {position_ids.shape}")
    if rope_deltas is None:
        rope_deltas = position_ids.max(axis=(0, 2)) + 1 - mask.sum(-1)
    rope_deltas = np.asarray(rope_deltas, np.int32).reshape(ids.shape[0], 1)
    out = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, rope_deltas=rope_deltas)
    if pixel_values is not None:
        vi = batch.get("vision_inputs")
        if vi is None:
            out["pixel_values"], out["vision_inputs"] = layout_images(
                pixel_values, np.asarray(grid), config.vision, slot_multiple=slot_multiple
            )
        else:
            out["pixel_values"], out["vision_inputs"] = np.asarray(pixel_values), vi
    return out


def resolve_stop_ids(config: ModelConfig, extra: Sequence[int] | None = None, use_eos: bool = True) -> tuple[int, ...]:
    """The model's EOS id(s) (unless `use_eos=False`) followed by `extra`, deduplicated, in order."""
    eos = config.text.eos_token_id if use_eos else None
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    ids += list(extra or ())
    return tuple(dict.fromkeys(int(i) for i in ids))


def batch_sharding(mesh: Mesh | None, batch_axes: Sequence[str] | None = None) -> NamedSharding | None:
    """Sharding of a batch's leading axis over the mesh's batch axes (default: those of "data", "fsdp" present)."""
    if mesh is None:
        return None
    axes = tuple(batch_axes) if batch_axes is not None else tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} contain none of the batch axes ('data', 'fsdp')")
    return NamedSharding(mesh, P(axes))


def generate(
    model: Qwen25VL | ModelConfig,
    params: Any,
    batch: dict[str, Any],
    key: Array,
    sp: SamplingParams = SamplingParams(),
    *,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
) -> Rollout:
    """Sample `sp.num_generations` completions for every prompt of `batch` (see the module docstring).

    Args:
      model: the model's module (`models.build_model`; or its `ModelConfig`); params: its parameters (float32 or
        bfloat16).
      batch: prompt batch, e.g. `Processor(...)(texts, images)` (left-padded).
      key: a `jax.random` key; the result is a deterministic function of it.
      sp: the sampling settings (`SamplingParams`; resolved here against the model's EOS, pad and placeholder ids:
        a VL model never samples its image / video placeholders unless `suppress_token_ids=()`).
      mesh: shard the prompts (and so the B*G rollout rows) over the mesh's batch axes (`batch_axes`, default
        "data" and "fsdp"); B must be divisible by their size. Params already placed on the mesh keep their
        sharding; params elsewhere (e.g. on one device) are replicated over it.
    Returns a `Rollout` of device arrays with B * num_generations rows.

    One compilation per distinct (B, T, number of patches) and sampling settings: bucket prompt lengths and
    image sizes on the host (the data pipeline does) to keep the number of compilations small.
    """
    config = model.config if isinstance(model, Qwen25VL) else model
    sp = sp.resolve(config)
    sharding = batch_sharding(mesh, batch_axes)
    inputs = prepare_prompts(config, batch, slot_multiple=rows_multiple(sharding))
    if sharding is not None:
        from jaxvlm.distributed import feed_global_batch

        # every process holds all prompts; each feeds its devices' rows
        inputs = feed_global_batch(inputs, input_shardings(inputs, sharding))
        params = _on_mesh(params, mesh)
    return compiled_sampler(sharding)(params, inputs, key, config=config, sp=sp)


def rows_multiple(sharding: NamedSharding | None) -> int:
    """How many devices the prompts (and their image slots) split over: the size of `sharding`'s batch axes."""
    return 1 if sharding is None else int(np.prod([sharding.mesh.shape[a] for a in sharding.spec[0]]))


def default_suppressed_ids(config: ModelConfig) -> tuple[int, ...]:
    """Placeholder ids a VL model must not generate (its image and video pads); none for a text-only model."""
    return () if config.vision is None else (config.image_token_id, config.video_token_id)


def _on_mesh(params: Any, mesh: Mesh) -> Any:
    """Leave leaves already laid out on `mesh`'s devices alone; replicate the others over it."""
    devices = set(mesh.devices.flat)
    replicated = NamedSharding(mesh, P())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and set(sharding.device_set) == devices:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, params)


def input_shardings(inputs: dict[str, Any], sharding: NamedSharding) -> dict[str, Any]:
    """Placements of `prepare_prompts`' arrays: per-prompt arrays on their row axis, image slots on their slot axis,
    over the batch axes of `sharding`. The prompt count must split over them."""
    from jaxvlm import sharding as shard_rules

    size = rows_multiple(sharding)
    if inputs["input_ids"].shape[0] % size:
        raise ValueError(
            f"{inputs['input_ids'].shape[0]} prompts cannot be split over the {size} devices of mesh axes "
            f"{sharding.spec[0]}; pad the prompt batch to a multiple of {size}"
        )
    return shard_rules.batch_shardings(inputs, sharding.mesh, {"position_ids": 1}, axes=tuple(sharding.spec[0]))


def decode_completions(tokenizer, rollout: Rollout, *, skip_special_tokens: bool = True) -> list[str]:
    """Completion texts, one per row: the masked tokens of each row decoded with the tokenizer."""
    tokens = np.asarray(rollout.tokens)
    lengths = np.asarray(rollout.lengths)
    return [
        tokenizer.decode(tokens[r, : lengths[r]].tolist(), skip_special_tokens=skip_special_tokens)
        for r in range(tokens.shape[0])
    ]
