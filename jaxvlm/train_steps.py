"""Training steps: pure functions `(state, batch) -> (state, metrics)` for SFT, GRPO and DyME.

Batch layout (host-built, static shapes). Every sequence is a left-padded prompt of T tokens followed by a
right-padded completion of N tokens — the sampler's layout — so the N completion log-probs come from the static
slice of hidden states at columns T-1 .. T+N-2 and the LM head never runs over the prompt:

    prompt_ids, prompt_mask            int [.., b, T]
    completion_ids, completion_mask    int [.., b, N]    (the mask is the loss mask: SFT targets / sampled tokens)
    position_ids                       int [.., 3, b, T+N]  (`jaxvlm.sampling.rollout_sequences` builds them)
    pixel_values, vision_inputs        optional: the micro-batch's images in S slots ([.., S, L, patch_dim] and the
                                       index arrays of `jaxvlm.processing.vision_layout`), split over devices by slot
    image_offset [.., b]               optional: where each row's image features start (rows sharing an image)
    advantages [.., b], old_logp / ref_logp [.., b, N]        (GRPO)
    rewards, accuracy [.., b], reference_ids / reference_mask [.., b, N]   (DyME, see `dyme_plan`)

Leading axes: SFT `[M, b, ...]` with M gradient-accumulation micro-batches; GRPO and DyME `[K, M, b, ...]` with K
mini-batches of one rollout batch (each mini-batch is one optimizer update; all K are repeated
`num_iterations` = μ times, so from the second update on the ratio to the sampler's `old_logp` moves and the
clip binds). Losses return a sum and a normaliser (see `jaxvlm.losses`); micro-batch gradients of the sums are
added and divided by the summed normaliser, so accumulation is exact for every aggregation mode.

A non-finite loss or gradient norm skips the update (params and optimizer state unchanged, `update_skipped`=1).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxvlm import checks, losses
from jaxvlm.models import lora
from jaxvlm.models.qwen2_5_vl import Qwen25VL, head_weight
from jaxvlm.sharding import BATCH, constrain, path_str, traced_on

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer updates applied
    params: Any  # float32 master weights
    opt_state: Any
    rng: Array  # typed PRNG key (rollout sampling, dropout-free model)


# ----------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine decay) | "constant" (linear warmup, then flat)
    warmup_steps: int = 0
    total_steps: int = 1000  # for the cosine decay
    final_lr_ratio: float = 0.0  # cosine ends at learning_rate * final_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    frozen: tuple[str, ...] = ()  # regexes on param paths never updated, e.g. ("^visual/",) freezes the vision tower
    no_decay: tuple[str, ...] = (r"bias$", r"scale$")  # HF Trainer: no weight decay on biases and norm weights

    def validate(self) -> None:
        """FieldError naming the first field out of range (a negative learning rate would train uphill)."""
        checks.check_fields(self, OPTIMIZER_RULES)
        for field in ("frozen", "no_decay"):
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise checks.FieldError(field, f"{pattern!r} is not a regular expression: {error}") from None


OPTIMIZER_RULES = {
    "learning_rate": checks.number(0),
    "schedule": checks.one_of("cosine", "constant"),
    "warmup_steps": checks.integer(0),
    "total_steps": checks.integer(1),
    "final_lr_ratio": checks.number(0, 1),
    "weight_decay": checks.number(0),
    "b1": checks.number(0, 1, hi_open=True),
    "b2": checks.number(0, 1, hi_open=True),
    "eps": checks.number(0, lo_open=True),
    "max_grad_norm": checks.optional(checks.number(0, lo_open=True)),
    "frozen": checks.sequence_of(checks.text),
    "no_decay": checks.sequence_of(checks.text),
}


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        if cfg.warmup_steps <= 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                optax.constant_schedule(cfg.learning_rate),
            ],
            [cfg.warmup_steps],
        )
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
            end_value=cfg.learning_rate * cfg.final_lr_ratio,
        )
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")


def _path_labels(params, patterns: tuple[str, ...]):
    return jax.tree_util.tree_map_with_path(lambda p, _: any(re.search(r, path_str(p)) for r in patterns), params)


def trainable_mask(params, frozen: tuple[str, ...]):
    """Pytree of bools: True where a parameter is trained (its path matches none of `frozen`)."""
    return jax.tree.map(lambda f: not f, _path_labels(params, frozen))


def make_optimizer(cfg: OptimizerConfig, params) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup + cosine schedule, over the trainable params
    (`lora.split_trainable`: the adapters of a tree that holds LoRA adapters, else every parameter); frozen subtrees
    get zero updates and no optimizer state. `params` (or their abstract shapes) give the tree structure for the
    masks: the full tree, whose `frozen` patterns must match some parameter."""
    if cfg.frozen and not any(jax.tree.leaves(_path_labels(params, cfg.frozen))):
        raise ValueError(f"optimizer.frozen patterns {cfg.frozen} match no parameter")
    params, _ = lora.split_trainable(params)
    frozen = _path_labels(params, cfg.frozen)
    decay = jax.tree.map(lambda nd: not nd, _path_labels(params, cfg.no_decay))
    adamw = optax.adamw(
        learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay
    )
    train = adamw if cfg.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    if not any(jax.tree.leaves(frozen)):
        return train
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    # Clipping sees only the trained gradients (the frozen ones are dropped by multi_transform first).
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def create_train_state(params, optimizer: optax.GradientTransformation, seed: int | Array = 0) -> TrainState:
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    opt_state = optimizer.init(lora.split_trainable(params)[0])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)


# ----------------------------------------------------------------------------------------------------------
# Loss configuration
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss settings (hashable: they are closed over by the jitted steps)."""

    temperature: float = 1.0  # logits are divided by the sampling temperature before the log-softmax (TRL)
    # GRPO
    surrogate: str = "clip"  # clip (PPO / GRPO) | cispo | sapo: `losses.policy_loss`
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None  # dual clip (TRL's form: min(ratio, delta))
    importance: str = "token"  # "token" | "sequence" (GSPO)
    beta: float = 0.0  # KL coefficient; 0 needs no reference model
    kl_estimator: str = "k3"
    aggregation: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    cispo_eps_max: float = 5.0  # surrogate "cispo": cap of the stop-gradient weight (TRL's epsilon_high for cispo)
    sapo_temperature_pos: float = 1.0  # surrogate "sapo": gate temperature for A > 0 (TRL's default)
    sapo_temperature_neg: float = 1.05  # surrogate "sapo": gate temperature for A <= 0 (TRL's default)
    num_iterations: int = 1  # μ: passes over one rollout batch
    # π_old of the ratio: "sampler" (the rollout's own log-probs) | "recompute" (teacher-forced by the trainer with the
    # sampler's params, before the first update: TRL's old_per_token_logps). `_policy_updates`.
    old_logp: str = "sampler"
    # Correction for the sampler / trainer mismatch (needs old_logp="recompute"): `losses.sampler_importance_weights`
    sampler_correction: str = "none"  # none | token_truncate | token_mask | sequence_truncate | sequence_mask
    sampler_correction_min: float = 0.0  # C_min (0: no lower bound; TRL's vllm_importance_sampling_clip_min None)
    sampler_correction_max: float = 3.0  # C_max (TRL's vllm_importance_sampling_clip_max)
    # SFT
    sft_aggregation: str = "token"  # "token" (mean over all target tokens) | "sequence" (mean of per-row means)
    # DyME
    dyme_granularity: str = "prompt"  # "prompt" (authors' code) | "batch" (whole step switches)
    dyme_sft_threshold: float = 0.5  # "batch": SFT when the share of no-correct groups is >= this
    dyme_correct_threshold: float = 0.5  # a rollout is correct when its accuracy reward > this
    # Advantages
    group_size: int = 2
    advantage_scale: str = "group"  # group | batch | none

    def validate(self) -> None:
        """FieldError naming the first field out of range."""
        checks.check_fields(self, LOSS_RULES)
        if self.delta is not None and not self.delta > 1 + self.eps_high:
            raise checks.FieldError("delta", f"the two-sided clip must be > 1 + eps_high = {1 + self.eps_high}")
        # A setting the chosen surrogate never reads is refused rather than ignored (TRL's cispo, for one, reads
        # epsilon_high as its cap: loss.eps_high would silently do nothing here).
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        used_by = {
            "eps_low": "clip",
            "eps_high": "clip",
            "delta": "clip",
            "cispo_eps_max": "cispo",
            "sapo_temperature_pos": "sapo",
            "sapo_temperature_neg": "sapo",
        }
        for field, surrogate in used_by.items():
            if self.surrogate != surrogate and getattr(self, field) != defaults[field]:
                hint = " (CISPO's cap is cispo_eps_max)" if field == "eps_high" and self.surrogate == "cispo" else ""
                raise checks.FieldError(
                    field,
                    f"{getattr(self, field)!r} is read by surrogate={surrogate!r} only, and surrogate is "
                    f"{self.surrogate!r}{hint}; leave it at its default {defaults[field]!r}",
                )
        if self.sampler_correction != "none" and self.old_logp != "recompute":
            raise checks.FieldError(
                "sampler_correction",
                f"{self.sampler_correction!r} weighs tokens by trainer / sampler probabilities, which needs the "
                f"trainer's log-probs: set old_logp='recompute' (got {self.old_logp!r})",
            )
        for field in ("sampler_correction_min", "sampler_correction_max"):
            if self.sampler_correction == "none" and getattr(self, field) != defaults[field]:
                raise checks.FieldError(
                    field,
                    f"{getattr(self, field)!r} is read only with a sampler_correction, and it is 'none'; leave it "
                    f"at its default {defaults[field]!r}",
                )
        if not self.sampler_correction_min < self.sampler_correction_max:
            raise checks.FieldError(
                "sampler_correction_min",
                f"{self.sampler_correction_min!r} must be below sampler_correction_max={self.sampler_correction_max!r}",
            )


LOSS_RULES = {
    "temperature": checks.number(0, lo_open=True),
    "eps_low": checks.number(0, 1, hi_open=True),
    "eps_high": checks.number(0),
    "delta": checks.optional(checks.number(1, lo_open=True)),
    "importance": checks.one_of("token", "sequence"),
    "beta": checks.number(0),
    "kl_estimator": checks.one_of(*losses.KL_ESTIMATORS),
    "aggregation": checks.one_of(*losses.POLICY_AGGREGATIONS),
    "surrogate": checks.one_of(*losses.POLICY_SURROGATES),
    "cispo_eps_max": checks.number(0, lo_open=True),
    "sapo_temperature_pos": checks.number(0, lo_open=True),
    "sapo_temperature_neg": checks.number(0, lo_open=True),
    "num_iterations": checks.integer(1),
    "old_logp": checks.one_of("sampler", "recompute"),
    "sampler_correction": checks.one_of(*losses.SAMPLER_CORRECTIONS),
    "sampler_correction_min": checks.number(0),
    "sampler_correction_max": checks.number(0, lo_open=True),
    "sft_aggregation": checks.one_of(*losses.SFT_AGGREGATIONS),
    "dyme_granularity": checks.one_of("prompt", "batch"),
    "dyme_sft_threshold": checks.number(0, 1),
    "dyme_correct_threshold": checks.number(0, 1),
    "group_size": checks.integer(1),
    "advantage_scale": checks.one_of(*losses.ADVANTAGE_SCALES),
}


# ----------------------------------------------------------------------------------------------------------
# Forward: completion log-probs
# ----------------------------------------------------------------------------------------------------------


def completion_logprobs(model: Qwen25VL, params, batch: dict, temperature: float = 1.0, with_entropy: bool = False):
    """log π(completion token | prefix) [b, N] (and the entropy [b, N]) of one micro-batch, in float32."""
    prompt_len = batch["prompt_ids"].shape[-1]
    n = batch["completion_ids"].shape[-1]
    ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=-1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=-1)
    hidden = model.apply(
        {"params": params},
        ids,
        mask,
        batch.get("pixel_values"),
        None,
        batch["position_ids"],
        vision_inputs=batch.get("vision_inputs"),
        image_offset=batch.get("image_offset"),
        method="encode",
        rngs={"dropout": batch["dropout_rng"]} if "dropout_rng" in batch else None,
    )
    scored = hidden[:, prompt_len - 1 : prompt_len + n - 1]
    logp, entropy = lm_head_logprobs(model, params, scored, batch["completion_ids"], temperature)
    return (logp, entropy) if with_entropy else logp


def lm_head_logprobs(model: Qwen25VL, params, hidden: Array, targets: Array, temperature: float = 1.0):
    """Log-probs of `targets` [b, N] and the entropy [b, N] (float32) from final hidden states [b, N, D], with the
    LM head run over chunks of `model.config.logits_chunk` positions and `model.config.vocab_chunk` vocabulary
    entries, so that neither [b, N, V] logits nor (under FSDP) the whole gathered [V, D] head ever exist at once.

    * Positions: up to one chunk, at once; longer completions go through a scan over position chunks whose body
      is rematerialised (the backward recomputes a chunk's logits from its hidden states). With `remat` on, a
      single chunk is rematerialised too, so its logits are not kept for the backward.
    * Vocabulary: a head larger than one chunk is read chunk by chunk, with an online (max, sum of exponentials)
      log-sum-exp in float32; each chunk's logits are recomputed in the backward, and its weight gradient is
      formed chunk by chunk. Under FSDP a chunk is gathered, and its gradient reduced, one chunk at a time (libtpu
      all-reduces the chunk's gradient and keeps its own slice, where a reduce-scatter would move half as much)."""
    b, n, d = hidden.shape
    chunk = min(model.config.logits_chunk, n)
    weight = head_weight(model.config, params)  # [V, D]
    vocab = weight.shape[0]
    pieces = -(-vocab // model.config.vocab_chunk)

    def one(h, t):  # h [b, c, D], t [b, c]
        if pieces == 1:
            logits = constrain(model.apply({"params": params}, h, method="lm_logits"), BATCH, None, "tensor")
            return losses.logprobs_from_logits(logits, t, temperature), losses.entropy_from_logits(logits, temperature)
        return _vocab_chunked_logprobs(h.astype(model.config.dtype), weight, t, temperature, pieces)

    if chunk == n:
        return (one if model.config.remat == "none" else jax.checkpoint(one))(hidden, targets)
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    per_chunk = lambda x: jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)  # noqa: E731  [chunks, b, c, ..]
    _, (logp, entropy) = jax.lax.scan(
        lambda carry, xs: (carry, jax.checkpoint(one)(*xs)), None, (per_chunk(hidden), per_chunk(targets))
    )
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1)[:, :n]  # noqa: E731
    return unchunk(logp), unchunk(entropy)


def _vocab_chunked_logprobs(h: Array, weight: Array, targets: Array, temperature: float, pieces: int):
    """log softmax(h W^T / temperature) at `targets`, and the entropy, over `pieces` vocabulary chunks of
    `weight` [V, D]: h [b, c, D], targets [b, c] -> ([b, c], [b, c]) float32."""
    vocab = weight.shape[0]
    size = -(-vocab // pieces)
    weight = jnp.pad(weight.astype(h.dtype), ((0, pieces * size - vocab), (0, 0))).reshape(pieces, size, -1)
    neg = jnp.finfo(jnp.float32).min

    @jax.checkpoint
    def step(carry, xs):
        top, total, weighted, picked = carry  # running max, sum exp(z - top), sum exp(z - top) z, target logit
        w, start = xs
        z = jnp.einsum("bcd,vd->bcv", h, w).astype(jnp.float32) / temperature  # as lm_logits: compute dtype
        ids = start + jnp.arange(size)
        z = constrain(jnp.where(ids < vocab, z, neg), BATCH, None, "tensor")
        new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(z, axis=-1)))
        scale = jnp.exp(top - new_top)
        p = jnp.exp(z - new_top[..., None])
        total = total * scale + jnp.sum(p, axis=-1)
        weighted = weighted * scale + jnp.sum(p * jnp.where(p > 0, z, 0.0), axis=-1)
        picked = picked + jnp.sum(jnp.where(ids == targets[..., None], z, 0.0), axis=-1)
        return (new_top, total, weighted, picked), None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    init = (jnp.full(targets.shape, neg, jnp.float32), zeros, zeros, zeros)
    (top, total, weighted, picked), _ = jax.lax.scan(step, init, (weight, jnp.arange(pieces) * size))
    log_normalizer = top + jnp.log(total)
    return picked - log_normalizer, log_normalizer - weighted / total


# ----------------------------------------------------------------------------------------------------------
# Accumulation and update
# ----------------------------------------------------------------------------------------------------------


def _tree_zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def reduce_metrics(stacked: dict[str, Array]) -> dict[str, Array]:
    """Scalar metrics stacked on a leading axis (micro-batches, or updates) -> scalars, by name: `*_sum` add up,
    `*_max` / `*_min` take the extreme, the rest are averaged."""

    def one(name: str, x: Array) -> Array:
        x = x.astype(jnp.float32)
        if name.endswith("_sum"):
            return jnp.sum(x, axis=0)
        if name.endswith("_max"):
            return jnp.max(x, axis=0)
        if name.endswith("_min"):
            return jnp.min(x, axis=0)
        return jnp.mean(x, axis=0)

    return {name: one(name, x) for name, x in stacked.items()}


def accumulate_gradients(loss_fn, params, microbatches: dict, dropout_rng: Array | None = None):
    """Sum `loss_fn(params, mb) -> (loss_sum, (normaliser, metrics))` and its gradient over the leading axis.

    Returns (grads, loss, metrics): grads = Σ ∇loss_sum / Σ normaliser over the trainable params only
    (`lora.split_trainable`: the adapters of a tree with LoRA adapters, whose frozen base gets no gradient at all),
    loss = Σ loss_sum / Σ normaliser, metrics over micro-batches by `reduce_metrics` (averaged, unless named *_sum /
    *_max / *_min). Gradients accumulate in float32. `dropout_rng`: one key per micro-batch is split from it and
    passed to the model (`dropout_rng` in the micro-batch: LoRA dropout); None runs the model deterministically.
    """
    trainable, frozen = lora.split_trainable(params)
    grad_fn = jax.value_and_grad(lambda t, mb: loss_fn(lora.join(t, frozen), mb), has_aux=True)
    if dropout_rng is not None:
        count = jax.tree.leaves(microbatches)[0].shape[0]
        microbatches = {**microbatches, "dropout_rng": jax.random.split(dropout_rng, count)}

    def micro(carry, mb):
        grads, total, norm = carry
        (loss_sum, (normaliser, m)), g = grad_fn(trainable, mb)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return (grads, total + loss_sum, norm + normaliser), m

    init = (_tree_zeros(trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, norm), metrics = jax.lax.scan(micro, init, microbatches)
    safe = jnp.maximum(norm, 1.0)  # as losses.py: loss = sum / max(normaliser, 1)
    grads = jax.tree.map(lambda g: g / safe, grads)
    return grads, total / safe, reduce_metrics(metrics)


def dropout_rng(state: TrainState, model, update: Array | int = 0) -> Array | None:
    """The key of one update's LoRA dropout (a fresh one per optimizer step and update), or None when the model
    has no dropout to draw (no LoRA, or lora.dropout = 0)."""
    settings = model.config.lora
    if settings is None or settings.dropout == 0:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.rng, DROPOUT_STREAM), state.step), update)


DROPOUT_STREAM = 0xD0  # folded into the state's key for dropout (the sampler draws from the key itself)


def apply_gradients(state: TrainState, grads, loss: Array, optimizer, schedule) -> tuple[TrainState, dict]:
    """One optimizer update of the trainable params (`grads` holds theirs alone), skipped (state unchanged) when
    the loss or gradients are not finite."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    trainable, frozen = lora.split_trainable(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + finite.astype(jnp.int32),
        params=lora.join(keep(new_trainable, trainable), frozen),
        opt_state=keep(opt_state, state.opt_state),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "update_skipped": (~finite).astype(jnp.float32),
    }
    return new_state, metrics


# ----------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------


def sft_loss_fn(params, mb, *, model: Qwen25VL, cfg: LossConfig):
    logp = completion_logprobs(model, params, mb, 1.0)
    mask = mb["completion_mask"]
    loss_sum, normaliser = losses.sft_loss(logp, mask, aggregation=cfg.sft_aggregation)
    tokens = jnp.sum(mask).astype(jnp.float32)
    metrics = {"tokens": tokens, "nll_per_token": jax.lax.stop_gradient(-jnp.sum(logp * mask) / jnp.maximum(tokens, 1))}
    return loss_sum, (normaliser, metrics)


def sft_step(state: TrainState, batch: dict, *, model, optimizer, schedule, cfg: LossConfig):
    """One optimizer update on `batch` [M, b, ...] (M accumulated micro-batches)."""
    loss_fn = functools.partial(sft_loss_fn, model=model, cfg=cfg)
    grads, loss, metrics = accumulate_gradients(loss_fn, state.params, batch, dropout_rng(state, model))
    state, update_metrics = apply_gradients(state, grads, loss, optimizer, schedule)
    return state, {**metrics, **update_metrics}


# ----------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------


def grpo_loss_fn(params, mb, *, model: Qwen25VL, cfg: LossConfig):
    """Policy loss (`cfg.surrogate`) of one micro-batch. Rows flagged `on_policy` (DyME's spliced references) use
    old_logp = stop_gradient(logp): ratio 1 in value, gradient -A ∇log π (CISPO: -min(1, cispo_eps_max) A ∇log π).
    A scalar `sft_mode` (DyME "batch") replaces the loss by the per-sequence SFT mean over the `on_policy` rows."""
    logp, entropy = completion_logprobs(model, params, mb, cfg.temperature, with_entropy=True)
    mask = mb["completion_mask"]
    old = mb["old_logp"]
    on_policy = mb.get("on_policy")
    if on_policy is not None:
        old = jnp.where(on_policy[:, None], jax.lax.stop_gradient(logp), old)
    sampled = mask if on_policy is None else mask * ~on_policy[:, None]  # the tokens the sampler drew
    loss_sum, normaliser, metrics = losses.policy_loss(
        logp,
        old,
        mb["advantages"],
        mask,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        delta=cfg.delta,
        importance=cfg.importance,
        ref_logp=mb.get("ref_logp"),
        beta=cfg.beta,
        kl_estimator=cfg.kl_estimator,
        aggregation=cfg.aggregation,
        max_completion_length=mask.shape[-1],
        entropy=jax.lax.stop_gradient(entropy),
        surrogate=cfg.surrogate,
        cispo_eps_max=cfg.cispo_eps_max,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        is_weight=mb.get("is_weight"),
    )
    if cfg.old_logp == "sampler":
        # old_logp is the sampler's: at the first update (params = the sampler's) this is the sampler / trainer
        # mismatch, which `_policy_updates` keeps from that update only.
        mismatch = losses.sampler_mismatch(logp, mb["old_logp"], sampled)
        metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
    if on_policy is not None:
        # DyME's reference rows: their surrogate's value says nothing of the fit (-A for "clip"), so report their NLL
        # as a sum and a token count (both averaged alike over micro-batches and updates: their ratio stays exact).
        ref_tokens = mask * on_policy[:, None]
        metrics["reference_nll_sum"] = jax.lax.stop_gradient(-jnp.sum(logp * ref_tokens))
        metrics["reference_tokens_sum"] = jnp.sum(ref_tokens).astype(jnp.float32)
    if "sft_mode" in mb:
        ref_rows = on_policy.astype(jnp.float32)
        sft_sum, _ = losses.sft_loss(logp, mask * ref_rows[:, None], aggregation="sequence")
        loss_sum = jnp.where(mb["sft_mode"], sft_sum, loss_sum)
        normaliser = jnp.where(mb["sft_mode"], jnp.sum(ref_rows), normaliser)
    return loss_sum, (normaliser, metrics)


def rollout_logprobs(model: Qwen25VL, params, batch: dict, num_leading: int, temperature: float) -> Array:
    """log π_params of the completions of every micro-batch of `batch` [*leading, b, ...] -> [*leading, b, N], one
    micro-batch at a time (lax.map), without gradient: the KL reference's log-probs, or the trainer's π_old."""
    lead = batch["completion_ids"].shape[:num_leading]
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[num_leading:]), batch)
    logp = jax.lax.map(lambda one: completion_logprobs(model, params, one, temperature), flat)
    return jax.lax.stop_gradient(logp.reshape(*lead, *logp.shape[1:]))


def recompute_old_logp(state: TrainState, batch: dict, *, model: Qwen25VL, cfg: LossConfig) -> tuple[dict, dict]:
    """`loss.old_logp = "recompute"`: π_old <- the trainer's teacher-forced log-probs of the rollouts with the
    sampler's params (the state before any update), and with a `sampler_correction` the importance weights
    `is_weight` from trainer / sampler log-probs. Returns the batch and the metrics: the mismatch over every row
    (`losses.mismatch_summary`; DyME's spliced reference rows, `on_policy`, are not the sampler's and not counted)
    and the correction's weights (`losses.correction_summary`)."""
    sampler_logp = batch["old_logp"]
    trainer_logp = rollout_logprobs(model, state.params, batch, sampler_logp.ndim - 2, cfg.temperature)
    mask = batch["completion_mask"]
    if "on_policy" in batch:
        mask = mask * ~batch["on_policy"][..., None]
    width = sampler_logp.shape[-1]
    flat = lambda x: x.reshape(-1, width)  # noqa: E731  [rows, N]
    metrics = losses.mismatch_summary(losses.sampler_mismatch(flat(trainer_logp), flat(sampler_logp), flat(mask)))
    batch = {**batch, "old_logp": trainer_logp}
    if cfg.sampler_correction != "none":
        weight = losses.sampler_importance_weights(
            flat(trainer_logp),
            flat(sampler_logp),
            flat(mask),
            cfg.sampler_correction,
            clip_min=cfg.sampler_correction_min,
            clip_max=cfg.sampler_correction_max,
        )
        batch["is_weight"] = weight.reshape(sampler_logp.shape)
        metrics.update(losses.correction_summary(weight, flat(mask), cfg.sampler_correction_max))
    return batch, metrics


def _policy_updates(state: TrainState, batch: dict, loss_fn, optimizer, schedule, cfg: LossConfig, model):
    """μ passes over the K mini-batches of `batch` [K, M, b, ...]: K * μ optimizer updates, metrics reduced over
    updates (`reduce_metrics`). The sampler / trainer mismatch (`mismatch/*`) comes from the recomputation over
    every row (old_logp "recompute"), or else from the first update, whose params are the sampler's (the rows of
    the first mini-batch: every row when K = 1)."""
    k = jax.tree.leaves(batch)[0].shape[0]
    if cfg.old_logp == "recompute":
        batch, measured = recompute_old_logp(state, batch, model=model, cfg=cfg)

    def update(state, i):
        minibatch = jax.tree.map(lambda x: x[i % k], batch)
        grads, loss, metrics = accumulate_gradients(loss_fn, state.params, minibatch, dropout_rng(state, model, i))
        state, update_metrics = apply_gradients(state, grads, loss, optimizer, schedule)
        return state, {**metrics, **update_metrics}

    state, metrics = jax.lax.scan(update, state, jnp.arange(k * cfg.num_iterations))
    if cfg.old_logp == "sampler":
        first_update = {name.removeprefix("mismatch/"): x[0] for name, x in metrics.items() if "mismatch/" in name}
        measured = losses.mismatch_summary(first_update)
    summary = reduce_metrics({name: x for name, x in metrics.items() if not name.startswith("mismatch/")})
    summary.update(measured)
    summary["updates"] = jnp.asarray(k * cfg.num_iterations, jnp.float32)
    summary["update_skipped"] = jnp.sum(metrics["update_skipped"])
    return state, summary


def grpo_step(state: TrainState, batch: dict, *, model, optimizer, schedule, cfg: LossConfig):
    """GRPO on one rollout batch [K, M, b, ...] with precomputed `advantages` (see `losses.group_advantages`)."""
    loss_fn = functools.partial(grpo_loss_fn, model=model, cfg=cfg)
    return _policy_updates(state, batch, loss_fn, optimizer, schedule, cfg, model)


# ----------------------------------------------------------------------------------------------------------
# DyME
# ----------------------------------------------------------------------------------------------------------

MODE_SKIP, MODE_EXPLORE, MODE_MEMORIZE = 0, 1, 2


def dyme_plan(rewards: Array, accuracy: Array, cfg: LossConfig) -> dict:
    """DyME's per-group mode decision, as traced data (the step compiles once).

    Args: rewards [R] (total reward, for the GRPO advantages), accuracy [R] (accuracy reward), R = groups * G,
      groups contiguous.
    Per group, c = #{rollouts with accuracy > dyme_correct_threshold}:
      * "prompt" granularity (DyME's code): c == 0 -> memorise: row 0 becomes the reference answer with advantage 1,
        the other rows advantage 0 (they stay in the denominator); c == G -> all advantages 0; otherwise the
        group-normalised GRPO advantages.
      * "batch" granularity: if the share of c == 0 groups is >= dyme_sft_threshold the whole step is SFT on every
        group's reference (row 0 of each group, per-sequence token mean over those rows only); otherwise GRPO
        advantages for every group (all-correct groups get 0 as always).
    Returns advantages [R], use_reference [R] bool (rows whose completion is replaced by the reference),
    sft_mode bool scalar, mode [groups] int32, and metrics.
    """
    g = cfg.group_size
    r = rewards.shape[0]
    correct = (accuracy > cfg.dyme_correct_threshold).reshape(r // g, g).sum(-1)
    none_correct, all_correct = correct == 0, correct == g
    grpo_adv = losses.group_advantages(rewards, g, scale=cfg.advantage_scale)
    first_row = (jnp.arange(r) % g) == 0
    memorize_rows = jnp.repeat(none_correct, g) & first_row
    if cfg.dyme_granularity == "prompt":
        sft_mode = jnp.zeros((), jnp.bool_)
        use_reference = memorize_rows
        explore = jnp.repeat(~none_correct & ~all_correct, g)
        advantages = jnp.where(use_reference, 1.0, jnp.where(explore, grpo_adv, 0.0))
        mode = jnp.where(none_correct, MODE_MEMORIZE, jnp.where(all_correct, MODE_SKIP, MODE_EXPLORE))
    else:
        sft_mode = jnp.mean(none_correct.astype(jnp.float32)) >= cfg.dyme_sft_threshold
        use_reference = sft_mode & first_row
        advantages = jnp.where(
            sft_mode, jnp.where(first_row, 1.0, 0.0), jnp.where(jnp.repeat(all_correct, g), 0.0, grpo_adv)
        )
        mode = jnp.where(sft_mode, MODE_MEMORIZE, jnp.where(all_correct, MODE_SKIP, MODE_EXPLORE)) * jnp.ones_like(
            correct
        )
    metrics = {
        "dyme/memorize_fraction": jnp.mean((mode == MODE_MEMORIZE).astype(jnp.float32)),
        "dyme/explore_fraction": jnp.mean((mode == MODE_EXPLORE).astype(jnp.float32)),
        "dyme/skip_fraction": jnp.mean((mode == MODE_SKIP).astype(jnp.float32)),
        "dyme/sft_mode": sft_mode.astype(jnp.float32),
        "frac_reward_zero_std": losses.group_reward_stats(rewards, g)["zero_std_fraction"],
        "accuracy": jnp.mean((accuracy > cfg.dyme_correct_threshold).astype(jnp.float32)),
        "reward": jnp.mean(rewards),
    }
    return dict(
        advantages=advantages.astype(jnp.float32),
        use_reference=use_reference,
        sft_mode=sft_mode,
        mode=mode,
        metrics=metrics,
    )


def dyme_step(state: TrainState, batch: dict, *, model, optimizer, schedule, cfg: LossConfig):
    """DyME on one rollout batch [K, M, b, ...] with `rewards`, `accuracy`, `reference_ids`, `reference_mask`
    (each row carries its prompt's reference). Decides per group (`dyme_plan`), splices references, updates."""
    lead = batch["rewards"].shape  # (K, M, b)
    flat = lambda x: x.reshape(-1)  # noqa: E731
    plan = dyme_plan(flat(batch["rewards"]), flat(batch["accuracy"]), cfg)
    use_ref = plan["use_reference"].reshape(lead)
    batch = dict(batch)
    batch["completion_ids"] = jnp.where(use_ref[..., None], batch.pop("reference_ids"), batch["completion_ids"])
    batch["completion_mask"] = jnp.where(use_ref[..., None], batch.pop("reference_mask"), batch["completion_mask"])
    batch["advantages"] = plan["advantages"].reshape(lead)
    batch["on_policy"] = use_ref
    batch["sft_mode"] = jnp.broadcast_to(plan["sft_mode"], lead[:2])
    del batch["rewards"], batch["accuracy"]
    loss_fn = functools.partial(grpo_loss_fn, model=model, cfg=cfg)
    state, metrics = _policy_updates(state, batch, loss_fn, optimizer, schedule, cfg, model)
    return state, {**metrics, **plan["metrics"]}


# ----------------------------------------------------------------------------------------------------------
# Compilation with explicit shardings
# ----------------------------------------------------------------------------------------------------------


def batch_row_axes(num_leading: int) -> dict[str, int | None]:
    """Row axis of the batch fields that differ from the default (`num_leading`: [M] for SFT, [K, M] for RL):
    position_ids [.., 3, b, S]. Image slots (`pixel_values` [.., S, L, patch_dim] and the vision index arrays
    [.., S, ...]) split over the devices on their slot axis like rows."""
    return {"position_ids": num_leading + 1}


def state_shardings(state: TrainState, mesh) -> TrainState:
    """Placements of a train state (arrays or `jax.eval_shape` structs) on `mesh`: params by `PARAM_RULES`, the
    optimizer state by the params it mirrors, the step counter and the PRNG key replicated (they are not
    parameters: the rules are not consulted for them). Called when a stage starts, so a parameter without a
    sharding rule fails here (`sharding.ShardingRuleError`), before anything is compiled."""
    from jaxvlm.sharding import opt_state_shardings, replicated, tree_shardings

    return TrainState(
        step=replicated(mesh),
        params=tree_shardings(state.params, mesh),
        opt_state=opt_state_shardings(state.opt_state, lora.split_trainable(state.params)[0], mesh),
        rng=replicated(mesh),
    )


def jit_step(step_fn, mesh, state_sharding: TrainState, batch_example: dict, num_leading: int, **static):
    """`step_fn` with its static arguments bound, jitted with explicit in/out shardings and the state donated;
    traced with `mesh` in context, so the model's activations are split by rows (`sharding.constrain`)."""
    from jaxvlm.sharding import batch_shardings, replicated

    batch_sharding = batch_shardings(batch_example, mesh, batch_row_axes(num_leading), default_axis=num_leading)
    fn = traced_on(functools.partial(step_fn, **static), mesh)  # activations constrained on this mesh
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    ), batch_sharding
