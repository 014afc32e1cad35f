"""Loss kernels for GRPO-family RL and SFT: pure, jittable, float32 inside.

Shapes: B rows (completions), T completion tokens per row (right-padded), V vocabulary size, N = P * G rewards
for P prompts with G generations each, grouped contiguously (rows g*G .. g*G+G-1 belong to prompt g, the
layout `jaxvlm.sampling.generate` returns). A mask is 1 on completion tokens and 0 on padding (any dtype; every
nonzero entry counts as 1). Every kernel casts its inputs to float32 and accumulates in float32. String and
integer settings are static: bad values raise `ValueError` at trace time.

Group-relative advantages (GRPO, as TRL computes them)
    r_i   = sum_k w_k r_ik                       (NaN columns skipped; a row whose columns are all NaN is NaN)
    A_i   = (r_i - mean_g) / (std + eps)         mean_g over the valid rows of i's group, std Bessel-corrected:
            std = std_g  ("group")  |  std over the whole batch ("batch")  |  no division, A_i = r_i - mean_g ("none")
    Rows with a NaN reward get A_i = 0; a group whose valid rewards are all equal gets A = 0 exactly.

KL estimators of KL(pi || pi_ref) per token (Schulman, "Approximating KL divergence"), with
l = clip(ref_logp - logp, -clamp, clamp):
    k1 = -l        k2 = l^2 / 2        k3 = exp(l) - l - 1

Policy-gradient term per token, by `surrogate` (coded as TRL 1.16 codes its loss types in
`GRPOTrainer._compute_loss`, trl/trainer/grpo_trainer.py), with sg = stop_gradient:
    l_t = clip(logp_t - old_logp_t, -c, c)
    r_t = exp(l_t)                                           importance="token"
    r_t = exp(sum_t m_t l_t / max(sum_t m_t, 1))              importance="sequence" (GSPO), same for every token
    "clip"   L_t = -min(c1 * A, c2 * A),   c1 = min(r_t, delta) (c1 = r_t without delta),       PPO / GRPO / DAPO
                                           c2 = clip(r_t, 1 - eps_low, 1 + eps_high)           clip-higher / two-sided
    "cispo"  L_t = -sg(min(r_t, eps_max)) * A * logp_t                       CISPO (MiniMax-M1), TRL loss_type "cispo"
    "sapo"   L_t = -(4 / tau) * sigmoid(tau * (r_t - 1)) * A,                SAPO, TRL loss_type "sapo"
             tau = tau_pos if A > 0 else tau_neg
    and then, with a sampler correction's weight w_t (`sampler_importance_weights`, 1 without one),
    L_t <- w_t * L_t + beta * KL_t       (TRL multiplies the policy term only, not the KL term)
Gradients: "clip" is -r A grad logp inside the clip band and 0 outside it; "cispo" is -min(r, eps_max) A grad logp
for every token (a capped token still learns, with a capped weight); "sapo" is -g(r) r A grad logp with the soft gate
g(r) = 4 sigmoid(x) (1 - sigmoid(x)), x = tau (r - 1), which is 1 at r = 1 and decays smoothly off policy.
On policy (old_logp = stop_gradient(logp)), r = 1 and grad L_t = -A grad logp_t for "clip" and "sapo", and
-min(1, eps_max) A grad logp_t for "cispo" (the same when eps_max >= 1; TRL recommends eps_max = 5).
TRL ties each of its two new loss types to one normalisation ("cispo" to the global token mean of "dapo", "sapo" to
the sequence mean of "grpo"); here `aggregation` stays orthogonal to `surrogate`, and TRL's exact losses are
(cispo, dapo) and (sapo, grpo).

Aggregation: kernels return (loss_sum, normalizer) so that gradient accumulation over micro-batches is exact:
    loss = sum over micro-batches of loss_sum / max(sum over micro-batches of normalizer, 1)
    "grpo"     loss_sum = sum_i (sum_t m L / max(sum_t m, 1))   normalizer = B        (mean of sequence means)
    "bnpo"     loss_sum = sum m L / max(sum m, 1)               normalizer = 1        (mean of micro-batch token means)
    "dr_grpo"  loss_sum = sum m L                                normalizer = B * max_completion_length
    "dapo"     loss_sum = sum m L                                normalizer = sum m    (global token mean)
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

Array = jax.Array

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
POLICY_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
POLICY_SURROGATES = ("clip", "cispo", "sapo")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SFT_AGGREGATIONS = ("token", "sequence")


# ----------------------------------------------------------------------------------------------------------
# static-argument checks (trace time)
# ----------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number (static), got {value!r}")


def _check_shape(name: str, x: Array, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _float_mask(mask: Array) -> Array:
    """0/1 float32 mask: every nonzero entry counts as one token."""
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    return num / jnp.maximum(den, 1.0)


# ----------------------------------------------------------------------------------------------------------
# group-relative advantages
# ----------------------------------------------------------------------------------------------------------


def _combined_rewards(rewards: Array, weights) -> Array:
    """[N] or [N, R] -> [N] float32: sum_k w_k r_k skipping NaN entries; NaN where a row is all NaN."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must have shape [N] or [N, R], got {tuple(rewards.shape)}")
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    num_columns = rewards.shape[1]
    weights = jnp.ones((num_columns,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    _check_shape("weights", weights, (num_columns,))
    present = ~jnp.isnan(rewards)
    total = jnp.sum(jnp.where(present, rewards * weights, 0.0), axis=1)
    return jnp.where(jnp.any(present, axis=1), total, jnp.nan)


def _num_groups(num_rows: int, group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise ValueError(f"group_size must be a Python int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2, got {group_size}: a group of one completion has no baseline "
            "(its advantage would always be 0)"
        )
    if num_rows % group_size:
        raise ValueError(f"number of rewards N={num_rows} is not divisible by group_size G={group_size}")
    return num_rows // group_size


def _nan_moments(values: Array, axis: int) -> tuple[Array, Array, Array, Array]:
    """mean, Bessel-corrected std, valid count and "all valid values equal" along `axis`, ignoring NaN.

    Fewer than two valid values give std 0; no valid value gives mean 0 and std 0.
    """
    valid = ~jnp.isnan(values)
    count = jnp.sum(valid, axis=axis)
    zeroed = jnp.where(valid, values, 0.0)
    mean = _safe_div(jnp.sum(zeroed, axis=axis), count)
    centered = jnp.where(valid, values - jnp.expand_dims(mean, axis), 0.0)
    variance = jnp.sum(centered**2, axis=axis) / jnp.maximum(count - 1, 1)
    largest = jnp.max(jnp.where(valid, values, -jnp.inf), axis=axis)
    smallest = jnp.min(jnp.where(valid, values, jnp.inf), axis=axis)
    all_equal = (count < 2) | (largest == smallest)
    std = jnp.where(all_equal, 0.0, jnp.sqrt(variance))
    return mean, std, count, all_equal


def group_reward_stats(rewards: Array, group_size: int, *, weights: Array | None = None) -> dict[str, Array]:
    """Per-group reward statistics for logging.

    Args:
      rewards: [N] or [N, R] rewards (R reward columns), N = P * G, groups contiguous; NaN = missing.
      group_size: G, a Python int >= 2.
      weights: [R] column weights (default ones).

    Returns:
      dict with `mean` [P] and `std` [P] (Bessel-corrected, NaN rows ignored; 0 for fewer than two valid rows)
      and scalar `zero_std_fraction`: the fraction of groups whose valid rewards are all equal (TRL's
      frac_reward_zero_std; those groups give zero advantages and no learning signal).
    """
    combined = _combined_rewards(rewards, weights)
    num_groups = _num_groups(combined.shape[0], group_size)
    mean, std, _, all_equal = _nan_moments(combined.reshape(num_groups, group_size), axis=1)
    return dict(mean=mean, std=std, zero_std_fraction=jnp.mean(all_equal.astype(jnp.float32)))


def group_advantages(
    rewards: Array, group_size: int, *, weights: Array | None = None, scale: str = "group", eps: float = 1e-4
) -> Array:
    """Group-relative advantages A_i = (r_i - mean_group) / (std + eps).

    Args:
      rewards: [N] or [N, R] rewards, N = P * G, rows g*G .. g*G+G-1 are prompt g's group. NaN entries are
        skipped in the weighted sum; a row with all columns NaN is excluded from its group's statistics.
      group_size: G, a Python int >= 2.
      weights: [R] column weights w_k of r_i = sum_k w_k r_ik (default ones).
      scale: "group" (std of the group), "batch" (std of all valid rewards; mean still per group) or "none".
      eps: added to the std.

    Returns:
      [N] float32 advantages; 0 for rows whose reward is NaN and for every row of a group whose valid rewards are
      all equal.
    """
    _check_choice("scale", scale, ADVANTAGE_SCALES)
    combined = _combined_rewards(rewards, weights)
    num_groups = _num_groups(combined.shape[0], group_size)
    grouped = combined.reshape(num_groups, group_size)
    mean, group_std, _, all_equal = _nan_moments(grouped, axis=1)
    centered = jnp.where(all_equal[:, None], 0.0, grouped - mean[:, None])
    if scale == "group":
        centered = centered / (group_std[:, None] + eps)
    elif scale == "batch":
        _, batch_std, _, _ = _nan_moments(combined, axis=0)
        centered = centered / (batch_std + eps)
    advantages = jnp.where(jnp.isnan(grouped), 0.0, centered)
    return advantages.reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# KL penalty
# ----------------------------------------------------------------------------------------------------------


def kl_penalty(logp: Array, ref_logp: Array, estimator: str = "k3", clamp: float = 20.0) -> Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Args:
      logp: [B, T] log pi(token). ref_logp: [B, T] log pi_ref(token).
      estimator: "k1" = -l, "k2" = l^2 / 2, "k3" = exp(l) - l - 1, with l = clip(ref_logp - logp, -clamp, clamp)
        (the clamp keeps exp finite).

    Returns:
      [B, T] float32 (k2 and k3 are >= 0; k1 is unbiased but can be negative).
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_positive("clamp", clamp)
    log_ratio = jnp.clip(jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32), -clamp, clamp)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return jnp.exp(log_ratio) - log_ratio - 1.0


# ----------------------------------------------------------------------------------------------------------
# sampler / trainer mismatch
# ----------------------------------------------------------------------------------------------------------

# The band of sampler-to-trainer token ratios counted as "in agreement" by `sampler_mismatch`.
MISMATCH_RATIO_BAND = (0.5, 2.0)


def sampler_mismatch(trainer_logp: Array, sampler_logp: Array, mask: Array) -> dict[str, Array]:
    """How far the sampler's log-probs of its own tokens are from the trainer's teacher-forced ones, as sums (so
    micro-batches add up exactly; `mismatch_summary` turns them into means).

    With d_t = trainer_logp_t - sampler_logp_t on the masked tokens (sampled from the sampler, so
    KL(sampler || trainer) is estimated by k3 = exp(d) - d - 1 >= 0):

    Args:
      trainer_logp, sampler_logp: [B, T] log-probs of the same tokens. mask: [B, T], nonzero on counted tokens.

    Returns:
      float32 scalars: abs_sum = sum |d|, abs_max = max |d| (0 without tokens), k3_sum = sum k3(d),
      outside_sum = #tokens with exp(d) outside [0.5, 2], tokens_sum = #tokens. No gradient.
    """
    trainer_logp = jnp.asarray(trainer_logp, jnp.float32)
    _check_shape("sampler_logp", jnp.asarray(sampler_logp), trainer_logp.shape)
    _check_shape("mask", jnp.asarray(mask), trainer_logp.shape)
    mask_f = _float_mask(mask)
    valid = mask_f > 0
    d = jnp.where(valid, trainer_logp - jnp.asarray(sampler_logp, jnp.float32), 0.0)
    # exp(d) - d - 1 (d clamped to +-20). The mismatch is often ~1e-6, where that difference cancels to float32
    # rounding (and comes out negative): below |d| = 0.1 its Taylor series d^2 (1/2 + d/6 + d^2/24 + d^3/120), whose
    # relative error there is < 1e-6.
    dc = jnp.clip(d, -20.0, 20.0)
    series = dc * dc * (0.5 + dc * (1.0 / 6.0 + dc * (1.0 / 24.0 + dc / 120.0)))
    k3 = jnp.maximum(jnp.where(jnp.abs(dc) < 0.1, series, jnp.expm1(dc) - dc), 0.0)
    low, high = MISMATCH_RATIO_BAND
    outside = valid & ((d < jnp.log(low)) | (d > jnp.log(high)))
    sums = dict(
        abs_sum=jnp.sum(jnp.abs(d)),
        abs_max=jnp.max(jnp.abs(d), initial=0.0),
        k3_sum=jnp.sum(k3 * mask_f),
        outside_sum=jnp.sum(outside.astype(jnp.float32)),
        tokens_sum=jnp.sum(mask_f),
    )
    return jax.lax.stop_gradient(sums)


def mismatch_summary(sums: dict[str, Array], prefix: str = "mismatch/") -> dict[str, Array]:
    """Logged metrics from `sampler_mismatch` sums: logp_abs_mean, logp_abs_max, k3 (token mean of the k3 estimate of
    KL(sampler || trainer)), ratio_outside_fraction (share of tokens whose ratio is outside [0.5, 2]), tokens."""
    tokens = sums["tokens_sum"]
    return {
        f"{prefix}logp_abs_mean": _safe_div(sums["abs_sum"], tokens),
        f"{prefix}logp_abs_max": sums["abs_max"],
        f"{prefix}k3": _safe_div(sums["k3_sum"], tokens),
        f"{prefix}ratio_outside_fraction": _safe_div(sums["outside_sum"], tokens),
        f"{prefix}tokens": tokens,
    }


def sampler_importance_weights(
    trainer_logp: Array,
    sampler_logp: Array,
    mask: Array,
    mode: str,
    *,
    clip_min: float = 0.0,
    clip_max: float = 3.0,
    log_ratio_clamp: float = 20.0,
) -> Array:
    """Importance weights correcting for sampling from the sampler instead of the trainer's policy (TRL 1.16
    `vllm_importance_sampling_mode`, verl's rollout correction: truncated / masked importance sampling, TIS / MIS).

    With d_t = trainer_logp_t - sampler_logp_t on masked tokens (0 elsewhere):
      token_*:    rho_t = exp(d_t)                       a ratio per token
      sequence_*: rho_t = exp(sum_t' m_t' d_t')          one ratio per row, on every token (TRL sums; no mean)
      *_truncate: w = clip(rho, clip_min, clip_max)      (TIS)
      *_mask:     w = rho if clip_min <= rho <= clip_max else 0      (MIS)
    The exponent is clamped to +-log_ratio_clamp first (TRL does not clamp; exp would overflow to inf, which its
    clamp maps to clip_max and its mask to 0, as the clamped value does here).

    Args:
      trainer_logp, sampler_logp, mask: [B, T]. mode: one of SAMPLER_CORRECTIONS except "none".
      clip_min: lower bound C_min (0: none, TRL's None). clip_max: upper bound C_max (TRL's default 3.0).

    Returns:
      [B, T] float32 weights, constants (no gradient), 0 on masked-out positions.
    """
    _check_choice("mode", mode, SAMPLER_CORRECTIONS[1:])
    if not isinstance(clip_min, numbers.Real) or not isinstance(clip_max, numbers.Real) or not 0 <= clip_min < clip_max:
        raise ValueError(f"need 0 <= clip_min < clip_max, got clip_min={clip_min!r}, clip_max={clip_max!r}")
    trainer_logp = jnp.asarray(trainer_logp, jnp.float32)
    _check_shape("sampler_logp", jnp.asarray(sampler_logp), trainer_logp.shape)
    _check_shape("mask", jnp.asarray(mask), trainer_logp.shape)
    mask_f = _float_mask(mask)
    d = jnp.where(mask_f > 0, trainer_logp - jnp.asarray(sampler_logp, jnp.float32), 0.0)
    if mode.startswith("sequence"):
        d = jnp.broadcast_to(jnp.sum(d, axis=1, keepdims=True), d.shape)
    rho = jnp.exp(jnp.clip(d, -log_ratio_clamp, log_ratio_clamp))
    if mode.endswith("truncate"):
        weight = jnp.clip(rho, clip_min, clip_max)
    else:
        weight = jnp.where((rho >= clip_min) & (rho <= clip_max), rho, 0.0)
    return jax.lax.stop_gradient(weight * mask_f)


def correction_summary(weight: Array, mask: Array, clip_max: float, prefix: str = "sampler_correction/"):
    """Logged metrics of `sampler_importance_weights` over the masked tokens: weight_mean, weight_min, weight_max
    (TRL's sampling/importance_sampling_ratio/*), zeroed_fraction (tokens a *_mask mode dropped) and capped_fraction
    (tokens whose weight is C_max: the cap binds, *_truncate modes). 0 (never NaN) without tokens."""
    mask_f = _float_mask(mask)
    valid = mask_f > 0
    weight = jnp.asarray(weight, jnp.float32)
    any_token = jnp.any(valid)
    return {
        f"{prefix}weight_mean": _masked_mean(weight, mask_f),
        f"{prefix}weight_min": jnp.where(any_token, jnp.min(jnp.where(valid, weight, jnp.inf)), 0.0),
        f"{prefix}weight_max": jnp.where(any_token, jnp.max(jnp.where(valid, weight, -jnp.inf)), 0.0),
        f"{prefix}zeroed_fraction": _masked_mean((weight == 0).astype(jnp.float32), mask_f),
        f"{prefix}capped_fraction": _masked_mean((weight == jnp.float32(clip_max)).astype(jnp.float32), mask_f),
    }


# ----------------------------------------------------------------------------------------------------------
# clipped policy loss
# ----------------------------------------------------------------------------------------------------------


def _check_policy_settings(
    *,
    eps_low,
    eps_high,
    delta,
    importance,
    beta,
    ref_logp,
    aggregation,
    max_completion_length,
    log_ratio_clamp,
    surrogate,
    cispo_eps_max,
    sapo_temperature_pos,
    sapo_temperature_neg,
) -> None:
    _check_choice("importance", importance, IMPORTANCE_LEVELS)
    _check_choice("aggregation", aggregation, POLICY_AGGREGATIONS)
    _check_positive("log_ratio_clamp", log_ratio_clamp)
    if not isinstance(eps_low, numbers.Real) or not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if not isinstance(eps_high, numbers.Real) or not eps_high >= 0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high!r}")
    if delta is not None and (not isinstance(delta, numbers.Real) or not delta > 1 + eps_high):
        raise ValueError(f"delta (two-sided clip) must be > 1 + eps_high = {1 + eps_high}, got {delta!r}")
    _check_choice("surrogate", surrogate, POLICY_SURROGATES)
    if surrogate != "clip" and delta is not None:
        raise ValueError(f"delta={delta!r} is the clip surrogate's two-sided clip; surrogate={surrogate!r} has none")
    _check_positive("cispo_eps_max", cispo_eps_max)
    _check_positive("sapo_temperature_pos", sapo_temperature_pos)
    _check_positive("sapo_temperature_neg", sapo_temperature_neg)
    if ref_logp is None and not (isinstance(beta, numbers.Real) and beta == 0):
        raise ValueError(f"beta={beta!r} adds a KL penalty, which needs ref_logp (got None)")
    if aggregation == "dr_grpo" and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, numbers.Integral)
        or max_completion_length < 1
    ):
        raise ValueError(
            f"aggregation='dr_grpo' needs max_completion_length, a positive int; got {max_completion_length!r}"
        )


def _importance_ratio(log_ratio: Array, mask: Array, importance: str) -> Array:
    """[B, T] ratio pi / pi_old: per token, or GSPO's exp(masked mean log-ratio) broadcast over the row."""
    if importance == "token":
        return jnp.exp(log_ratio)
    sequence_log_ratio = _safe_div(jnp.sum(log_ratio * mask, axis=1), jnp.sum(mask, axis=1))
    return jnp.broadcast_to(jnp.exp(sequence_log_ratio)[:, None], log_ratio.shape)


def _aggregate(per_token: Array, mask: Array, aggregation: str, max_completion_length) -> tuple[Array, Array]:
    """(loss_sum, normalizer) of a masked [B, T] per-token loss (see the module docstring)."""
    num_rows = per_token.shape[0]
    masked_sum = jnp.sum(per_token * mask)
    tokens = jnp.sum(mask)
    if aggregation == "grpo":
        loss_sum = jnp.sum(_safe_div(jnp.sum(per_token * mask, axis=1), jnp.sum(mask, axis=1)))
        return loss_sum, jnp.float32(num_rows)
    if aggregation == "bnpo":
        return _safe_div(masked_sum, tokens), jnp.float32(1.0)
    if aggregation == "dr_grpo":
        return masked_sum, jnp.float32(num_rows * max_completion_length)
    return masked_sum, tokens


def _masked_mean(x: Array, mask: Array) -> Array:
    return _safe_div(jnp.sum(x * mask), jnp.sum(mask))


def _policy_metrics(ratio, mask, valid, low, high, kl, entropy, extra) -> dict[str, Array]:
    """Masked scalar diagnostics; 0 (never NaN) when there is no token. `low` / `high`: [B, T] bool, the tokens the
    surrogate clipped on each side; `extra`: surrogate-specific [B, T] float per-token values, masked means."""
    tokens = jnp.sum(mask)
    any_token = tokens > 0
    metrics = dict(
        clip_low_fraction=_masked_mean(low.astype(jnp.float32), mask),
        clip_high_fraction=_masked_mean(high.astype(jnp.float32), mask),
        clip_region_fraction=_masked_mean((low | high).astype(jnp.float32), mask),
        ratio_min=jnp.where(any_token, jnp.min(jnp.where(valid, ratio, jnp.inf)), 0.0),
        ratio_mean=_masked_mean(ratio, mask),
        ratio_max=jnp.where(any_token, jnp.max(jnp.where(valid, ratio, -jnp.inf)), 0.0),
        kl=jnp.float32(0.0) if kl is None else _masked_mean(kl, mask),
        tokens=tokens,
    )
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask)
    metrics.update({name: _masked_mean(x, mask) for name, x in extra.items()})
    return jax.lax.stop_gradient(metrics)


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    importance: str = "token",
    ref_logp: Array | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    entropy: Array | None = None,
    log_ratio_clamp: float = 20.0,
    surrogate: str = "clip",
    cispo_eps_max: float = 5.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    is_weight: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """Policy loss of GRPO and its variants: the clipped surrogate (GRPO, DAPO, Dr. GRPO, BNPO, GSPO, two-sided clip),
    CISPO and SAPO (module docstring: the formulas, as TRL 1.16 codes them).

    Args:
      logp: [B, T] log pi_theta of the completion tokens (the only input gradients should flow through).
      old_logp: [B, T] log pi_old of the same tokens (sampler log-probs, or stop_gradient(logp) on policy).
      advantages: [B] per-completion advantages (e.g. `group_advantages`).
      mask: [B, T] completion mask, nonzero on completion tokens. Masked positions never affect the loss.
      eps_low, eps_high: c2 = clip(r, 1 - eps_low, 1 + eps_high) (DAPO's clip-higher when eps_high > eps_low);
        read by the "clip" surrogate only.
      delta: two-sided clip: c1 = min(r, delta) caps the ratio of negative-advantage tokens (> 1 + eps_high);
        "clip" surrogate only.
      importance: "token" ratios, or "sequence" (GSPO: exp of the row's masked mean log-ratio).
      ref_logp: [B, T] reference-model log-probs; needed when beta != 0, and enables the `kl` metric.
      beta: KL coefficient; adds beta * kl_penalty(logp, ref_logp, kl_estimator) per token.
      kl_estimator: "k1", "k2" or "k3".
      aggregation: "grpo", "bnpo", "dr_grpo" or "dapo" (see the module docstring).
      max_completion_length: int, the Dr. GRPO constant (required for "dr_grpo").
      entropy: optional [B, T] per-token entropies, only for the `entropy` metric.
      log_ratio_clamp: log pi - log pi_old is clipped to +-this before exp.
      surrogate: "clip" (PPO's clipped ratio), "cispo" (stop-gradient weight min(r, cispo_eps_max) times A log pi)
        or "sapo" (the soft gate (4 / tau) sigmoid(tau (r - 1)) in place of the clip).
      cispo_eps_max: CISPO's cap on the importance weight (> 0). TRL has no field of its own for it: its "cispo"
        reads `epsilon_high` (which defaults to `epsilon`, 0.2); 5.0 is the value TRL's docs recommend (ScaleRL).
      sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (> 0) for tokens with A > 0 and A <= 0
        (TRL's defaults 1.0 and 1.05).
      is_weight: optional [B, T] constant weights on the policy term (not the KL term): a sampler correction,
        `sampler_importance_weights`. No gradient flows into them.

    Returns:
      (loss_sum, normalizer, metrics): float32 scalars with loss = loss_sum / max(normalizer, 1) for one batch, and
      sum(loss_sum) / max(sum(normalizer), 1) over accumulated micro-batches. metrics (float32 scalars, no
      gradient): clip_low_fraction, clip_high_fraction, clip_region_fraction, ratio_min, ratio_mean, ratio_max,
      kl (masked mean, 0 without ref_logp), entropy (only when given), tokens (sum of the mask). The clip fractions
      are token fractions: "clip": r < 1 - eps_low with A < 0 (low), r > 1 + eps_high with A > 0 (high), either
      (region: the tokens without gradient). "cispo": low 0 (no lower bound); high = region = r > eps_max with
      A > 0 (TRL's cispo_clip_ratio); plus cispo_capped_fraction: r > eps_max whatever A (every capped weight).
      "sapo": all three 0 (nothing is clipped); plus sapo_gate_mean, the masked mean of the gate g(r) (1 on policy).
    """
    _check_policy_settings(
        eps_low=eps_low,
        eps_high=eps_high,
        delta=delta,
        importance=importance,
        beta=beta,
        ref_logp=ref_logp,
        aggregation=aggregation,
        max_completion_length=max_completion_length,
        log_ratio_clamp=log_ratio_clamp,
        surrogate=surrogate,
        cispo_eps_max=cispo_eps_max,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
    )
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    logp = jnp.asarray(logp, jnp.float32)
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    same_shape = dict(old_logp=old_logp, mask=mask, ref_logp=ref_logp, entropy=entropy, is_weight=is_weight)
    for name, x in same_shape.items():
        if x is not None:
            _check_shape(name, jnp.asarray(x), logp.shape)
    _check_shape("advantages", jnp.asarray(advantages), logp.shape[:1])

    mask_f = _float_mask(mask)
    valid = mask_f > 0
    # Masked positions are replaced by 0 before any arithmetic, so padding values (even inf / NaN) cannot reach the
    # loss or its gradient.
    log_ratio = jnp.where(valid, logp - jnp.asarray(old_logp, jnp.float32), 0.0)
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = _importance_ratio(log_ratio, mask_f, importance)  # [B, T]
    adv = jnp.asarray(advantages, jnp.float32)[:, None]  # [B, 1]
    safe_logp = jnp.where(valid, logp, 0.0)
    no_clip = jnp.zeros(ratio.shape, jnp.bool_)
    extra = {}
    if surrogate == "clip":
        clipped_ratio = jnp.clip(ratio, 1 - eps_low, 1 + eps_high)
        capped_ratio = ratio if delta is None else jnp.minimum(ratio, delta)
        per_token = -jnp.minimum(capped_ratio * adv, clipped_ratio * adv)
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
    elif surrogate == "cispo":
        # TRL: clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach(); loss = -clamped_ratios * A * logp
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, cispo_eps_max))
        per_token = -weight * adv * safe_logp
        capped = ratio > cispo_eps_max
        low, high = no_clip, capped & (adv > 0)
        extra["cispo_capped_fraction"] = capped.astype(jnp.float32)
    else:
        # TRL: tau = where(A > 0, tau_pos, tau_neg); loss = -sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
        temperature = jnp.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)  # [B, 1]
        gate = jax.nn.sigmoid(temperature * (ratio - 1.0))
        per_token = -gate * (4.0 / temperature) * adv
        low, high = no_clip, no_clip
        extra["sapo_gate_mean"] = 4.0 * gate * (1.0 - gate)
    if is_weight is not None:
        per_token = per_token * jax.lax.stop_gradient(jnp.where(valid, jnp.asarray(is_weight, jnp.float32), 0.0))

    kl = None
    if ref_logp is not None:
        safe_ref = jnp.where(valid, jnp.asarray(ref_logp, jnp.float32), 0.0)
        kl = kl_penalty(safe_logp, safe_ref, kl_estimator, log_ratio_clamp)
        if not (isinstance(beta, numbers.Real) and beta == 0):
            per_token = per_token + beta * kl
    if entropy is not None:
        entropy = jnp.where(valid, jnp.asarray(entropy, jnp.float32), 0.0)

    loss_sum, normalizer = _aggregate(per_token, mask_f, aggregation, max_completion_length)
    metrics = _policy_metrics(ratio, mask_f, valid, low, high, kl, entropy, extra)
    return loss_sum, normalizer, metrics


# ----------------------------------------------------------------------------------------------------------
# supervised fine-tuning
# ----------------------------------------------------------------------------------------------------------


def sft_loss(logp: Array, mask: Array, *, aggregation: str = "token") -> tuple[Array, Array]:
    """Masked negative log-likelihood of the completion tokens.

    Args:
      logp: [B, T] log-probs of the target tokens. mask: [B, T], nonzero on completion tokens.
      aggregation: "token": (sum -m logp, sum m), a token mean over everything accumulated;
        "sequence": (sum_i sum_t -m logp / max(sum_t m, 1), B), a mean of per-sequence token means.

    Returns:
      (loss_sum, normalizer), float32 scalars; loss = sum(loss_sum) / max(sum(normalizer), 1).
    """
    _check_choice("aggregation", aggregation, SFT_AGGREGATIONS)
    logp = jnp.asarray(logp, jnp.float32)
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    _check_shape("mask", jnp.asarray(mask), logp.shape)
    mask_f = _float_mask(mask)
    nll = jnp.where(mask_f > 0, -logp, 0.0)
    if aggregation == "token":
        return jnp.sum(nll), jnp.sum(mask_f)
    return jnp.sum(_safe_div(jnp.sum(nll, axis=1), jnp.sum(mask_f, axis=1))), jnp.float32(logp.shape[0])


# ----------------------------------------------------------------------------------------------------------
# log-probs and entropy from logits
# ----------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
    """log softmax(logits / temperature) at the target ids, as z[target] - logsumexp(z), in float32.

    Args:
      logits: [B, T, V] (any float dtype). targets: [B, T] integer ids; ids outside [0, V) (e.g. -100 padding)
        are clipped into range and give a finite, meaningless value: mask them.
      temperature: static, > 0.

    Returns:
      [B, T] float32. Only the gathered [B, T] values are cast eagerly; under jit the float32 cast and the division
      fuse into the logsumexp reduction, so no second [B, T, V] array is kept.
    """
    _check_positive("temperature", temperature)
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    _check_shape("targets", targets, logits.shape[:-1])
    ids = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0].astype(jnp.float32) / temperature
    return picked - jax.nn.logsumexp(logits.astype(jnp.float32) / temperature, axis=-1)


def entropy_from_logits(logits: Array, temperature: float = 1.0) -> Array:
    """Entropy of softmax(logits / temperature): H = logsumexp(z) - sum_v p_v z_v, in float32.

    Args:
      logits: [B, T, V] (any float dtype; -inf entries, i.e. banned tokens, contribute 0).
      temperature: static, > 0.

    Returns:
      [B, T] float32, in [0, log V].
    """
    _check_positive("temperature", temperature)
    z = jnp.asarray(logits).astype(jnp.float32) / temperature
    log_normalizer = jax.nn.logsumexp(z, axis=-1)
    probs = jnp.exp(z - log_normalizer[..., None])
    expected_logit = jnp.sum(probs * jnp.where(probs > 0, z, 0.0), axis=-1)
    return log_normalizer - expected_logit
