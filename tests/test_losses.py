"""jaxvlm.losses against NumPy references written independently here (float64 loops), plus gradient, clipping,
accumulation, masking and jit checks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxvlm import losses

TOL = dict(rtol=1e-5, atol=1e-5)

# Tests call the kernels through jax.jit: one compilation per shape and setting is much cheaper on CPU than eager
# op-by-op dispatch, and it checks that every static-argument check runs at trace time.
group_advantages = jax.jit(losses.group_advantages, static_argnames=("group_size", "scale", "eps"))
group_reward_stats = jax.jit(losses.group_reward_stats, static_argnames=("group_size",))
kl_penalty = jax.jit(losses.kl_penalty, static_argnames=("estimator", "clamp"))
policy_loss = jax.jit(
    losses.policy_loss,
    static_argnames=(
        "eps_low",
        "eps_high",
        "delta",
        "importance",
        "beta",
        "kl_estimator",
        "aggregation",
        "max_completion_length",
        "log_ratio_clamp",
    ),
)
sft_loss = jax.jit(losses.sft_loss, static_argnames=("aggregation",))
logprobs_from_logits = jax.jit(losses.logprobs_from_logits, static_argnames=("temperature",))
entropy_from_logits = jax.jit(losses.entropy_from_logits, static_argnames=("temperature",))


@functools.cache
def _policy_value_and_grad(options: tuple):
    def objective(logp, rest):
        loss_sum, norm, metrics = losses.policy_loss(logp, **rest, **dict(options))
        return loss_sum, (norm, metrics)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def policy_value_and_grad(batch, **options):
    """(loss_sum, normalizer, metrics, d loss_sum / d logp) of losses.policy_loss, jitted once per setting."""
    rest = {k: v for k, v in batch.items() if k != "logp"}
    (loss_sum, (norm, metrics)), grad = _policy_value_and_grad(tuple(sorted(options.items())))(batch["logp"], rest)
    return loss_sum, norm, metrics, grad


# ----------------------------------------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------------------------------------


def ref_combined_rewards(rewards, weights=None):
    r = np.asarray(rewards, np.float64)
    r = r[:, None] if r.ndim == 1 else r
    w = np.ones(r.shape[1]) if weights is None else np.asarray(weights, np.float64)
    out = []
    for row in r:
        present = ~np.isnan(row)
        out.append(np.sum(row[present] * w[present]) if present.any() else np.nan)
    return np.array(out)


def ref_group_advantages(rewards, group_size, weights=None, scale="group", eps=1e-4):
    combined = ref_combined_rewards(rewards, weights)
    valid_all = combined[~np.isnan(combined)]
    batch_std = np.std(valid_all, ddof=1) if len(valid_all) >= 2 else 0.0
    out = np.zeros(len(combined))
    for start in range(0, len(combined), group_size):
        group = combined[start : start + group_size]
        values = group[~np.isnan(group)]
        if len(values) == 0 or np.all(values == values[0]):
            continue
        mean, std = values.mean(), np.std(values, ddof=1)
        for j, x in enumerate(group):
            if np.isnan(x):
                continue
            denominator = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out[start + j] = (x - mean) / denominator
    return out


def ref_kl(logp, ref_logp, estimator, clamp=20.0):
    log_ratio = np.clip(np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64), -clamp, clamp)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return np.exp(log_ratio) - log_ratio - 1


def ref_policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    eps_low=0.2,
    eps_high=0.2,
    delta=None,
    importance="token",
    ref_logp=None,
    beta=0.0,
    kl_estimator="k3",
    aggregation="grpo",
    max_completion_length=None,
    entropy=None,
    clamp=20.0,
):
    """Token-by-token loop over the completion tokens only."""
    logp, old_logp, adv = (np.asarray(x, np.float64) for x in (logp, old_logp, advantages))
    B, T = logp.shape
    rows = [[t for t in range(T) if mask[i, t] != 0] for i in range(B)]
    row_losses, ratios, kls, ents, low, high = [], [], [], [], 0, 0
    for i in range(B):
        log_ratios = [min(max(logp[i, t] - old_logp[i, t], -clamp), clamp) for t in rows[i]]
        seq_ratio = math.exp(sum(log_ratios) / max(len(rows[i]), 1))
        token_losses = []
        for t, lr in zip(rows[i], log_ratios):
            r = math.exp(lr) if importance == "token" else seq_ratio
            c2 = min(max(r, 1 - eps_low), 1 + eps_high)
            c1 = r if delta is None else min(r, delta)
            loss = -min(c1 * adv[i], c2 * adv[i])
            if ref_logp is not None:
                kl = float(ref_kl(logp[i, t], ref_logp[i, t], kl_estimator, clamp))
                kls.append(kl)
                loss += beta * kl
            if entropy is not None:
                ents.append(entropy[i, t])
            token_losses.append(loss)
            ratios.append(r)
            low += r < 1 - eps_low and adv[i] < 0
            high += r > 1 + eps_high and adv[i] > 0
        row_losses.append(token_losses)
    tokens = sum(len(x) for x in row_losses)
    total = sum(sum(x) for x in row_losses)
    if aggregation == "grpo":
        loss_sum, norm = sum(sum(x) / max(len(x), 1) for x in row_losses), B
    elif aggregation == "bnpo":
        loss_sum, norm = total / max(tokens, 1), 1
    elif aggregation == "dr_grpo":
        loss_sum, norm = total, B * max_completion_length
    else:
        loss_sum, norm = total, tokens
    n = max(tokens, 1)
    metrics = dict(
        clip_low_fraction=low / n,
        clip_high_fraction=high / n,
        clip_region_fraction=(low + high) / n,
        ratio_min=min(ratios, default=0.0),
        ratio_mean=sum(ratios) / n,
        ratio_max=max(ratios, default=0.0),
        kl=sum(kls) / n,
        tokens=tokens,
    )
    if entropy is not None:
        metrics["entropy"] = sum(ents) / n
    return loss_sum, norm, metrics


def ref_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def random_policy_batch(rng, B, T, p_mask=0.7, ref=True):
    logp = -rng.exponential(1.0, (B, T))
    old_logp = logp + rng.normal(0, 0.3, (B, T))
    mask = (rng.random((B, T)) < p_mask).astype(np.int32)
    batch = dict(
        logp=logp.astype(np.float32),
        old_logp=old_logp.astype(np.float32),
        advantages=rng.normal(0, 1, B).astype(np.float32),
        mask=mask,
    )
    if ref:
        batch["ref_logp"] = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    return batch


def assert_metrics_close(metrics, expected):
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(np.asarray(metrics[k]), v, err_msg=k, **TOL)
        assert metrics[k].dtype == jnp.float32 and metrics[k].shape == ()


# ----------------------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_match_numpy(scale, group_size):
    rng = np.random.default_rng(group_size)
    num_groups = 5
    rewards = rng.normal(0, 2, (num_groups * group_size, 3))
    rewards[:group_size] = rng.choice([0.0, 1.0], 3)  # group 0: every row equal -> zero std
    rewards[group_size, 1] = np.nan  # one NaN column: skipped in the sum
    rewards[2 * group_size] = np.nan  # a row with every column NaN: excluded, advantage 0
    rewards[3 * group_size : 4 * group_size - 1] = np.nan  # group 3: a single valid row -> no baseline
    weights = np.array([1.0, 0.5, -2.0])
    got = group_advantages(rewards, group_size, weights=weights, scale=scale)
    want = ref_group_advantages(rewards, group_size, weights, scale)
    assert got.shape == (len(rewards),) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(got)[:group_size] == 0)  # zero-std group: exactly zero
    assert got[2 * group_size] == 0 and np.all(np.asarray(got)[3 * group_size : 4 * group_size] == 0)


def test_group_advantages_1d_defaults_and_eps():
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 4.0], np.float32)
    got = group_advantages(rewards, 2)
    # Groups of 2: std = |a - b| / sqrt(2), so A = +-(1/sqrt(2)) * std / (std + eps).
    np.testing.assert_allclose(got, ref_group_advantages(rewards, 2), rtol=1e-5)
    np.testing.assert_allclose(got[:2], [0.7071, -0.7071], atol=1e-3)
    assert got[2] == 0 and got[3] == 0
    big_eps = group_advantages(rewards, 3, eps=1.0)
    np.testing.assert_allclose(big_eps, ref_group_advantages(rewards, 3, eps=1.0), rtol=1e-5)


def test_group_reward_stats_match_numpy():
    rng = np.random.default_rng(1)
    rewards = rng.choice([0.0, 0.5, 1.0], (12, 2))
    rewards[0:4] = [1.0, 0.5]  # group 0 all equal
    rewards[8:12, 0] = np.nan  # group 2: only the second column counts
    rewards[9] = np.nan
    stats = group_reward_stats(rewards, 4, weights=np.array([2.0, 1.0]))
    combined = ref_combined_rewards(rewards, [2.0, 1.0]).reshape(3, 4)
    np.testing.assert_allclose(stats["mean"], np.nanmean(combined, 1), **TOL)
    np.testing.assert_allclose(stats["std"], np.nanstd(combined, 1, ddof=1), **TOL)
    zero_std = np.mean([np.nanmax(g) == np.nanmin(g) for g in combined])
    np.testing.assert_allclose(stats["zero_std_fraction"], zero_std)
    assert stats["zero_std_fraction"] >= 1 / 3  # group 0 at least


def test_group_size_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2.*no baseline"):
        group_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="N=6.*G=4"):
        group_advantages(jnp.ones(6), 4)
    with pytest.raises(ValueError, match="N=6.*G=4"):
        group_reward_stats(jnp.ones(6), 4)
    with pytest.raises(ValueError, match="Python int"):
        group_advantages(jnp.ones(4), 2.0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.ones(4), 2, scale="global")
    with pytest.raises(ValueError, match="weights"):
        group_advantages(jnp.ones((4, 2)), 2, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(jnp.ones((4, 2, 1)), 2)


@settings(max_examples=25, deadline=None)
@given(
    rewards=st.lists(st.sampled_from([0.0, 0.25, 1.0, -3.0, 7.5, np.nan]), min_size=12, max_size=12),
    group_size=st.sampled_from([2, 3, 4]),
)
def test_advantages_sum_to_zero_per_group(rewards, group_size):
    rewards = np.array(rewards, np.float32)
    adv = np.asarray(group_advantages(rewards, group_size))
    assert np.all(np.isfinite(adv))
    stats = group_reward_stats(rewards, group_size)
    for g, std in enumerate(np.asarray(stats["std"])):
        group = adv[g * group_size : (g + 1) * group_size]
        if std > 0:
            assert abs(group.sum()) < 1e-4 * group_size
        else:
            assert np.all(group == 0)


# ----------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(estimator):
    rng = np.random.default_rng(2)
    logp, ref_logp = -rng.exponential(1, (3, 7)), -rng.exponential(1, (3, 7))
    got = kl_penalty(logp.astype(np.float32), ref_logp.astype(np.float32), estimator)
    assert got.shape == (3, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_kl(logp, ref_logp, estimator), **TOL)
    if estimator != "k1":
        assert np.all(np.asarray(got) >= 0)


def test_kl_clamp_keeps_values_and_gradients_finite():
    logp = jnp.array([[0.0, 0.0, -1000.0]])
    ref_logp = jnp.array([[1000.0, -1000.0, 0.0]])
    for estimator in ("k1", "k2", "k3"):
        got = kl_penalty(logp, ref_logp, estimator, clamp=20.0)
        np.testing.assert_allclose(got, ref_kl(logp, ref_logp, estimator, 20.0), rtol=1e-5)
        grad = jax.grad(lambda x, estimator=estimator: kl_penalty(x, ref_logp, estimator).sum())(logp)
        assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref_logp, "k4")
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(logp, ref_logp, "k3", clamp=0.0)


# ----------------------------------------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------------------------------------

POLICY_CASES = [
    dict(),
    dict(eps_low=0.1, eps_high=0.28, aggregation="dapo"),
    dict(importance="sequence", eps_low=3e-4, eps_high=4e-4, aggregation="grpo"),
    dict(delta=1.5, aggregation="bnpo", beta=0.04, kl_estimator="k3"),
    dict(aggregation="dr_grpo", max_completion_length=9, beta=0.1, kl_estimator="k2"),
    dict(aggregation="dapo", beta=0.0, kl_estimator="k1", with_entropy=True),
    dict(aggregation="grpo", importance="sequence", delta=2.0, without_ref=True),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 9)])
def test_policy_loss_matches_numpy(case, shape):
    case = dict(case)
    with_entropy, without_ref = case.pop("with_entropy", False), case.pop("without_ref", False)
    rng = np.random.default_rng(sum(shape))
    batch = random_policy_batch(rng, *shape, ref=not without_ref)
    batch["mask"][0] = 0  # a fully masked row
    batch["logp"][batch["mask"] == 0] = -rng.exponential(50, (batch["mask"] == 0).sum())  # padding garbage
    if with_entropy:
        batch["entropy"] = rng.uniform(0, 3, shape).astype(np.float32)
    loss_sum, norm, metrics = policy_loss(**batch, **case)
    want_sum, want_norm, want_metrics = ref_policy_loss(**batch, **case)
    np.testing.assert_allclose(loss_sum, want_sum, **TOL)
    np.testing.assert_allclose(norm, want_norm)
    assert loss_sum.dtype == norm.dtype == jnp.float32 and loss_sum.shape == norm.shape == ()
    assert_metrics_close(metrics, want_metrics)


def tiny_policy(seed=0, B=4, T=6, D=5, V=11):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0, 1, (B, T, D)), jnp.float32)
    W = jnp.asarray(rng.normal(0, 0.5, (D, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = np.ones((B, T), np.int32)
    mask[1, 3:] = 0
    mask[2] = 0
    mask[3, :1] = 0
    adv = jnp.asarray(rng.normal(0, 1, B), jnp.float32)
    return x, W, tokens, jnp.asarray(mask), adv


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_on_policy_gradient_is_advantage_weighted_logp(importance):
    x, W, tokens, mask, adv = tiny_policy()
    B = x.shape[0]

    def logp_of(W):
        return logprobs_from_logits(x @ W, tokens)

    def grpo_objective(W):
        logp = logp_of(W)
        loss_sum, norm, _ = policy_loss(
            logp, jax.lax.stop_gradient(logp), adv, mask, eps_low=0.05, eps_high=0.07, importance=importance
        )
        return loss_sum / norm

    def explicit(W):
        m = mask.astype(jnp.float32)
        lengths = jnp.maximum(m.sum(1), 1.0)
        return -(1.0 / B) * jnp.sum(adv / lengths * jnp.sum(m * logp_of(W), axis=1))

    np.testing.assert_allclose(grpo_objective(W), -jnp.sum(adv * (mask.sum(1) > 0)) / B, atol=1e-6)
    grad, want = jax.jit(jax.grad(grpo_objective))(W), jax.jit(jax.grad(explicit))(W)
    assert np.abs(np.asarray(grad)).max() > 1e-3
    np.testing.assert_allclose(grad, want, atol=1e-6, rtol=0)


def single_token_loss(ratio, advantage, **kwargs):
    """Loss and d loss / d logp of one token with the given ratio pi / pi_old (grpo: normalizer 1)."""
    batch = dict(
        logp=np.full((1, 1), math.log(ratio), np.float32),
        old_logp=np.zeros((1, 1), np.float32),
        advantages=np.array([advantage], np.float32),
        mask=np.ones((1, 1), np.int32),
    )
    value, _, metrics, grad = policy_value_and_grad(batch, **kwargs)
    return float(value), float(grad[0, 0]), metrics


@pytest.mark.parametrize(
    "ratio, advantage, clipped_value, side",
    [
        (0.85, -1.0, 0.90, "low"),  # below 1 - eps_low with A < 0: clipped
        (0.85, +1.0, None, None),  # below 1 - eps_low with A > 0: free (it lowers the loss to move back up)
        (1.25, +1.0, None, None),  # 1.25 < 1 + eps_high: not clipped
        (1.25, -1.0, None, None),  # above 1 with A < 0: never clipped by eps
        (1.35, +1.0, 1.30, "high"),  # above 1 + eps_high with A > 0: clipped
        (0.50, +2.0, None, None),
    ],
)
def test_asymmetric_clipping_binds_on_the_right_side(ratio, advantage, clipped_value, side):
    value, grad, metrics = single_token_loss(ratio, advantage, eps_low=0.1, eps_high=0.3)
    if clipped_value is None:
        np.testing.assert_allclose(value, -ratio * advantage, rtol=1e-6)
        np.testing.assert_allclose(grad, -ratio * advantage, rtol=1e-5)  # d(-r A)/dlogp = -r A
    else:
        np.testing.assert_allclose(value, -clipped_value * advantage, rtol=1e-6)
        assert grad == 0.0
    assert float(metrics["clip_low_fraction"]) == (side == "low")
    assert float(metrics["clip_high_fraction"]) == (side == "high")
    assert float(metrics["clip_region_fraction"]) == (side is not None)


def test_dual_clip_caps_ratio_for_negative_advantages():
    # A < 0, r = 3 > delta = 2: TRL's -min(min(r, delta) A, clip(r) A) = -delta A, no gradient.
    value, grad, _ = single_token_loss(3.0, -1.0, delta=2.0)
    assert value == pytest.approx(2.0, rel=1e-6) and grad == 0.0
    value, grad, _ = single_token_loss(3.0, -1.0)  # without delta the loss grows with r
    assert value == pytest.approx(3.0, rel=1e-6) and grad == pytest.approx(3.0, rel=1e-5)
    value, grad, _ = single_token_loss(1.5, -1.0, delta=2.0)  # below delta: untouched
    assert value == pytest.approx(1.5, rel=1e-6) and grad == pytest.approx(1.5, rel=1e-5)
    for delta in (None, 2.0):  # A > 0: the ordinary upper clip, delta irrelevant
        value, grad, _ = single_token_loss(3.0, 1.0, delta=delta)
        assert value == pytest.approx(-1.2, rel=1e-6) and grad == 0.0


def test_clip_fractions_match_numpy_counts():
    rng = np.random.default_rng(5)
    ratios = rng.uniform(0.5, 1.6, (5, 8))
    adv = np.array([-1.0, 1.0, 0.0, -0.3, 2.0], np.float32)
    mask = (rng.random((5, 8)) < 0.8).astype(bool)
    logp = np.log(ratios).astype(np.float32)
    _, _, metrics = policy_loss(logp, np.zeros_like(logp), adv, mask, eps_low=0.15, eps_high=0.25)
    r = np.exp(logp.astype(np.float64))[mask]
    a = np.broadcast_to(adv[:, None], mask.shape)[mask]
    low, high = (r < 0.85) & (a < 0), (r > 1.25) & (a > 0)
    assert low.sum() > 0 and high.sum() > 0
    np.testing.assert_allclose(metrics["clip_low_fraction"], low.mean(), **TOL)
    np.testing.assert_allclose(metrics["clip_high_fraction"], high.mean(), **TOL)
    np.testing.assert_allclose(metrics["clip_region_fraction"], (low | high).mean(), **TOL)
    np.testing.assert_allclose(metrics["tokens"], mask.sum())


def test_gspo_sequence_ratio_is_exp_of_masked_mean_log_ratio():
    rng = np.random.default_rng(6)
    batch = random_policy_batch(rng, 4, 7, ref=False)
    batch["mask"][2] = 0
    batch["old_logp"][batch["mask"] == 0] = 1e3  # ignored by the masked mean
    m = batch["mask"].astype(np.float64)
    log_ratio = (batch["logp"] - batch["old_logp"]).astype(np.float64)
    want = np.exp(np.where(m > 0, log_ratio, 0.0).sum(1) / np.maximum(m.sum(1), 1))
    # Without clipping and with A = 1 each row's loss is -r_i; one-hot advantages pick a row.
    for i in range(4):
        adv = np.eye(4, dtype=np.float32)[i]
        loss_sum, _, _ = policy_loss(**{**batch, "advantages": adv}, eps_low=0.999, eps_high=1e6, importance="sequence")
        np.testing.assert_allclose(loss_sum, -want[i] * (m[i].sum() > 0), rtol=1e-5)
    _, _, metrics = policy_loss(**batch, importance="sequence")
    np.testing.assert_allclose(metrics["ratio_min"], want[m.sum(1) > 0].min(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], want[m.sum(1) > 0].max(), rtol=1e-5)


@pytest.mark.parametrize("aggregation, split", [("grpo", 3), ("dapo", 2), ("dr_grpo", 3)])
def test_micro_batch_accumulation_is_exact(aggregation, split):
    rng = np.random.default_rng(7)
    batch = random_policy_batch(rng, 6, 8)
    batch["mask"][4] = 0
    kwargs = dict(aggregation=aggregation, max_completion_length=8, beta=0.05, eps_high=0.28)
    loss_sum, norm, _, grad = policy_value_and_grad(batch, **kwargs)
    parts = [
        policy_value_and_grad({k: v[s] for k, v in batch.items()}, **kwargs)
        for s in (slice(0, split), slice(split, None))
    ]
    total_norm = max(sum(float(p[1]) for p in parts), 1)
    np.testing.assert_allclose(sum(p[0] for p in parts) / total_norm, loss_sum / norm, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([p[3] for p in parts]) / total_norm, grad / norm, rtol=1e-5, atol=1e-7)


def test_bnpo_is_mean_of_micro_batch_token_means():
    rng = np.random.default_rng(8)
    batch = random_policy_batch(rng, 4, 5, ref=False)
    loss_sum, norm, _ = policy_loss(**batch, aggregation="bnpo")
    _, _, metrics = policy_loss(**batch, aggregation="dapo")
    dapo_sum, dapo_norm, _ = policy_loss(**batch, aggregation="dapo")
    assert float(norm) == 1.0 and float(metrics["tokens"]) == float(dapo_norm)
    np.testing.assert_allclose(loss_sum, dapo_sum / dapo_norm, rtol=1e-6)


def test_policy_loss_errors():
    batch = random_policy_batch(np.random.default_rng(9), 2, 3)
    no_ref = {k: v for k, v in batch.items() if k != "ref_logp"}
    cases = [
        (dict(aggregation="token_mean"), "aggregation"),
        (dict(importance="tok"), "importance"),
        (dict(kl_estimator="k9"), "kl_estimator"),
        (dict(aggregation="dr_grpo"), "max_completion_length"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(delta=1.1, eps_high=0.2), "delta"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            policy_loss(**batch, **kwargs)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(**no_ref, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(**{**batch, "advantages": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="mask"):
        policy_loss(**{**batch, "mask": np.ones((2, 4))})
    with pytest.raises(ValueError, match="aggregation"):  # at trace time under jit, too
        jax.jit(functools.partial(losses.policy_loss, aggregation="sum"))(**batch)


# ----------------------------------------------------------------------------------------------------------
# hypothesis: masks, finiteness, invariance to padding values
# ----------------------------------------------------------------------------------------------------------

GARBAGE = st.sampled_from([0.0, -1e4, 1e4, np.inf, -np.inf, np.nan])

# Settings covering every aggregation, importance level, KL estimator and the dual clip; each hypothesis example
# checks all of them in one compiled function (one compilation per shape keeps the test fast).
PADDING_SETTINGS = [
    dict(aggregation="grpo", importance="token"),
    dict(aggregation="bnpo", importance="sequence", beta=0.04, kl_estimator="k1"),
    dict(aggregation="dr_grpo", importance="token", beta=0.04, kl_estimator="k2", delta=3.0),
    dict(aggregation="dapo", importance="sequence", beta=0.04, kl_estimator="k3", eps_high=0.28),
]


@jax.jit
def all_settings_with_grads(batch):
    out = []
    for options in PADDING_SETTINGS:
        options = dict(options, max_completion_length=batch["logp"].shape[1])

        def objective(logp, options=options):
            loss_sum, norm, metrics = losses.policy_loss(**{**batch, "logp": logp}, **options)
            return loss_sum, (norm, metrics)

        (loss_sum, (norm, metrics)), grad = jax.value_and_grad(objective, has_aux=True)(batch["logp"])
        out.append(dict(loss_sum=loss_sum, norm=norm, metrics=metrics, grad=grad))
    sft = [losses.sft_loss(batch["logp"], batch["mask"], aggregation=a) for a in losses.SFT_AGGREGATIONS]
    return out, sft


@st.composite
def policy_problems(draw):
    B, T = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    batch = random_policy_batch(rng, B, T, p_mask=0.6)
    batch["entropy"] = rng.uniform(0, 2, (B, T)).astype(np.float32)
    mask_kind = draw(st.sampled_from(["random", "zero_rows", "all_zero", "all_one"]))
    if mask_kind == "zero_rows":
        batch["mask"][rng.random(B) < 0.5] = 0
    elif mask_kind == "all_zero":
        batch["mask"][:] = 0
    elif mask_kind == "all_one":
        batch["mask"][:] = 1
    return batch, draw(GARBAGE)


@settings(max_examples=25, deadline=None)
@given(problem=policy_problems())
def test_policy_loss_finite_and_blind_to_padding(problem):
    batch, garbage = problem
    padding = batch["mask"] == 0
    noisy = {
        k: (np.where(padding, garbage, v).astype(v.dtype) if k in ("logp", "old_logp", "ref_logp", "entropy") else v)
        for k, v in batch.items()
    }
    (clean, clean_sft), (dirty, dirty_sft) = all_settings_with_grads(batch), all_settings_with_grads(noisy)
    for options, c, d in zip(PADDING_SETTINGS, clean, dirty):
        loss = float(c["loss_sum"]) / max(float(c["norm"]), 1.0)
        assert np.isfinite(loss) and all(np.isfinite(float(v)) for v in c["metrics"].values()), options
        # identical, bit for bit, whatever the padding holds; no gradient reaches padded positions
        assert jax.tree.map(float, c["metrics"]) == jax.tree.map(float, d["metrics"]), options
        assert float(c["loss_sum"]) == float(d["loss_sum"]) and float(c["norm"]) == float(d["norm"]), options
        np.testing.assert_array_equal(c["grad"], d["grad"])
        assert np.all(np.isfinite(d["grad"])) and np.all(np.asarray(d["grad"])[padding] == 0), options
    assert jax.tree.map(float, clean_sft) == jax.tree.map(float, dirty_sft)
    assert all(np.isfinite(float(x)) for x in jax.tree.leaves(dirty_sft))


def test_metrics_carry_no_gradient():
    batch = random_policy_batch(np.random.default_rng(10), 2, 4)
    batch["entropy"] = np.ones((2, 4), np.float32)

    def metric_total(logp):
        metrics = losses.policy_loss(**{**batch, "logp": logp}, beta=0.1)[2]
        assert {"ratio_mean", "kl", "entropy", "clip_region_fraction", "ratio_max"} <= set(metrics)
        return sum(metrics.values())

    assert np.all(np.asarray(jax.jit(jax.grad(metric_total))(batch["logp"])) == 0)


# ----------------------------------------------------------------------------------------------------------
# SFT, log-probs, entropy
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_sft_loss_matches_numpy(aggregation):
    rng = np.random.default_rng(11)
    logp = -rng.exponential(1, (4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.6
    mask[1] = False
    logp[~mask] = -np.inf
    loss_sum, norm = sft_loss(logp, mask.astype(np.float32), aggregation=aggregation)
    nll = [[-float(logp[i, t]) for t in range(6) if mask[i, t]] for i in range(4)]
    if aggregation == "token":
        want = (sum(map(sum, nll)), sum(map(len, nll)))
    else:
        want = (sum(sum(x) / max(len(x), 1) for x in nll), 4)
    np.testing.assert_allclose(loss_sum, want[0], **TOL)
    np.testing.assert_allclose(norm, want[1])
    with pytest.raises(ValueError, match="aggregation"):
        sft_loss(logp, mask, aggregation="mean")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_numpy(dtype, temperature):
    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.normal(0, 4, (3, 5, 17)), dtype)
    targets = rng.integers(0, 17, (3, 5))
    ref = ref_log_softmax(np.asarray(logits.astype(jnp.float32)), temperature)
    got = logprobs_from_logits(logits, targets, temperature)
    assert got.shape == (3, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.take_along_axis(ref, targets[..., None], -1)[..., 0], **TOL)
    entropy = entropy_from_logits(logits, temperature)
    assert entropy.shape == (3, 5) and entropy.dtype == jnp.float32
    np.testing.assert_allclose(entropy, -(np.exp(ref) * ref).sum(-1), **TOL)


def test_entropy_with_banned_tokens_and_padding_targets():
    logits = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]], [[1.0, 2.0, 3.0, 4.0]]])
    np.testing.assert_allclose(entropy_from_logits(logits)[0, 0], math.log(2), rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda z: entropy_from_logits(z).sum())(logits)))
    got = logprobs_from_logits(logits, jnp.array([[-100], [2]]))
    assert np.all(np.isfinite(got))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, jnp.zeros((2, 1), jnp.int32), 0.0)
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(logits, jnp.zeros((2, 2), jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# jit
# ----------------------------------------------------------------------------------------------------------


def test_every_kernel_runs_under_jit_with_partial_static_strings():
    rng = np.random.default_rng(13)
    batch = random_policy_batch(rng, 4, 6)
    rewards = rng.normal(0, 1, (4, 2)).astype(np.float32)
    logits = rng.normal(0, 1, (4, 6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, (4, 6))
    logp = ref_log_softmax(logits, 0.9)
    calls = [
        (
            functools.partial(losses.group_advantages, group_size=2, scale="batch"),
            (rewards,),
            ref_group_advantages(rewards, 2, scale="batch"),
        ),
        (
            functools.partial(losses.kl_penalty, estimator="k2"),
            (batch["logp"], batch["ref_logp"]),
            ref_kl(batch["logp"], batch["ref_logp"], "k2"),
        ),
        (
            functools.partial(losses.sft_loss, aggregation="token"),
            (batch["logp"], batch["mask"]),
            (-(batch["logp"] * batch["mask"]).sum(), batch["mask"].sum()),
        ),
        (
            functools.partial(losses.logprobs_from_logits, temperature=0.9),
            (logits, targets),
            np.take_along_axis(logp, targets[..., None], -1)[..., 0],
        ),
        (functools.partial(losses.entropy_from_logits, temperature=0.9), (logits,), -(np.exp(logp) * logp).sum(-1)),
    ]
    for fn, args, want in calls:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), jax.jit(fn)(*args), want)
    options = dict(aggregation="dr_grpo", importance="sequence", beta=0.02, kl_estimator="k1", max_completion_length=6)
    loss_sum, norm, metrics = jax.jit(functools.partial(losses.policy_loss, **options))(**batch)
    want_sum, want_norm, want_metrics = ref_policy_loss(**batch, **options)
    np.testing.assert_allclose(loss_sum, want_sum, **TOL)
    assert float(norm) == want_norm == 24
    assert_metrics_close(metrics, want_metrics)
    stats = jax.jit(functools.partial(losses.group_reward_stats, group_size=2))(rewards)
    np.testing.assert_allclose(stats["std"], np.std(rewards.sum(1).reshape(2, 2), axis=1, ddof=1), **TOL)
