"""The sampler / trainer mismatch: `loss.old_logp` ("sampler" or "recompute"), the mismatch metrics
(`losses.sampler_mismatch`) and the importance-sampling corrections (`losses.sampler_importance_weights`, TRL 1.16's
`vllm_importance_sampling_mode`, from trl/trainer/grpo_trainer.py `_generate_and_score_completions`):

    d = (old_per_token_logps - sampling_per_token_logps) * mask           trainer minus sampler, per token
    sequence_*: d = d.sum(-1, keepdim=True)                                one ratio per row
    ratio = exp(d);  *_truncate: clamp(ratio, C_min, C_max);  *_mask: ratio, set to 0 outside [C_min, C_max]
    per_token_loss = per_token_loss * ratio      (the policy term; the KL term is added after)

NumPy references for the weights, the mismatch sums and the weighted loss with its gradient; the config checks;
the GRPO step in both old-log-prob modes; and the mismatch of the real sampler against the trainer in float32."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

from jaxvlm import checks, configuration, losses, models, sampling, train_steps
from jaxvlm.configuration import ConfigError
from jaxvlm.models.qwen2_5_vl import Qwen25VL
from test_losses_cispo_sapo import grpo_step_on, rl_config  # one-stage RL config; the jitted GRPO step

CLAMP = 20.0
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def make_logps(seed=0):
    """5 rows x 6 tokens of trainer and sampler log-probs: per-token ratios from ~0.2 to ~5, one row's summed
    log-ratio past the clamp, one row without tokens; padding holds inf / NaN."""
    rng = np.random.default_rng(seed)
    rows, width = 5, 6
    trainer = -rng.exponential(1.0, (rows, width))
    sampler = trainer + rng.normal(0.0, 0.7, (rows, width))
    sampler[1, :4] = trainer[1, :4] - 6.0  # row 1: sum of log-ratios 24 (> clamp), every token ratio e^6
    lengths = np.array([6, 4, 3, 5, 0])
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    garbage = np.resize(np.array([np.inf, -np.inf, np.nan]), mask.shape)
    trainer = np.where(mask > 0, trainer, garbage).astype(np.float32)
    sampler = np.where(mask > 0, sampler, garbage[::-1]).astype(np.float32)
    return trainer, sampler, mask


def reference_weights(trainer, sampler, mask, mode, clip_min, clip_max):
    """float64 loops: TRL's weights (the exponent clamped to +-20 as jaxvlm does; TRL's own exp overflow maps to the
    same result under its clamp / mask)."""
    rows, width = mask.shape
    w = np.zeros((rows, width))
    for i in range(rows):
        tokens = [t for t in range(width) if mask[i, t]]
        d = {t: float(trainer[i, t]) - float(sampler[i, t]) for t in tokens}
        for t in tokens:
            x = sum(d.values()) if mode.startswith("sequence") else d[t]
            rho = math.exp(min(max(x, -CLAMP), CLAMP))
            if mode.endswith("truncate"):
                w[i, t] = min(max(rho, clip_min), clip_max)
            else:
                w[i, t] = rho if clip_min <= rho <= clip_max else 0.0
    return w


@pytest.mark.parametrize("bounds", [(0.0, 3.0), (0.5, 1.5)], ids=["trl-default", "two-sided"])
@pytest.mark.parametrize("mode", MODES)
def test_importance_weights_match_numpy(mode, bounds):
    trainer, sampler, mask = make_logps()
    got = np.asarray(
        losses.sampler_importance_weights(trainer, sampler, mask, mode, clip_min=bounds[0], clip_max=bounds[1])
    )
    want = reference_weights(trainer, sampler, mask, mode, *bounds)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert np.isfinite(got).all() and (got[mask == 0] == 0).all()
    valid = mask > 0
    if mode.endswith("truncate"):  # the cap binds somewhere and the weights stay inside the bounds
        assert np.isclose(got[valid], bounds[1]).any() and (got[valid] >= bounds[0]).all()
    else:  # some tokens are dropped, the others keep their ratio
        assert (got[valid] == 0).any() and (got[valid] > 0).any()


def test_importance_weights_refuse_bad_settings():
    trainer, sampler, mask = make_logps()
    with pytest.raises(ValueError, match="mode must be one of"):
        losses.sampler_importance_weights(trainer, sampler, mask, "none")
    with pytest.raises(ValueError, match="clip_min < clip_max"):
        losses.sampler_importance_weights(trainer, sampler, mask, "token_mask", clip_min=2.0, clip_max=2.0)


def test_mismatch_sums_and_summary_match_numpy():
    trainer, sampler, mask = make_logps()
    got = losses.mismatch_summary(losses.sampler_mismatch(trainer, sampler, mask))
    valid = mask > 0
    d = trainer[valid].astype(np.float64) - sampler[valid].astype(np.float64)
    dc = np.clip(d, -CLAMP, CLAMP)
    want = {
        "mismatch/logp_abs_mean": np.mean(np.abs(d)),
        "mismatch/logp_abs_max": np.max(np.abs(d)),
        "mismatch/k3": np.mean(np.exp(dc) - dc - 1),
        "mismatch/ratio_outside_fraction": np.mean((np.exp(d) < 0.5) | (np.exp(d) > 2)),
        "mismatch/tokens": valid.sum(),
    }
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=2e-6, err_msg=k)
    assert 0 < want["mismatch/ratio_outside_fraction"] < 1  # the data straddles the band
    # A float32-sized mismatch: k3 ~ d^2 / 2, positive, where exp(d) - d - 1 in float32 cancels to rounding.
    tiny = np.float32(3e-6) * np.arange(1, 7, dtype=np.float32)[None]
    got = losses.mismatch_summary(losses.sampler_mismatch(tiny, np.zeros_like(tiny), np.ones_like(tiny)))
    x = tiny.astype(np.float64)
    np.testing.assert_allclose(float(got["mismatch/k3"]), np.mean(np.expm1(x) - x), rtol=1e-5)
    empty = losses.mismatch_summary(losses.sampler_mismatch(trainer, sampler, np.zeros_like(mask)))
    assert all(float(v) == 0 for v in empty.values())


# ----------------------------------------------------------------------------------------------------------
# the weighted policy loss: values and gradients
# ----------------------------------------------------------------------------------------------------------


def reference_loss(logp, old, adv, mask, weight, ref, beta, aggregation, eps=0.2):
    """float64: sum over tokens of w * (-min(rA, clip(r)A)) + beta * k3, aggregated by "grpo" or "dapo"."""
    rows = []
    for i in range(mask.shape[0]):
        row = []
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(min(max(logp[i, t] - old[i, t], -CLAMP), CLAMP))
            term = -min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i]) * weight[i, t]
            lr = min(max(ref[i, t] - logp[i, t], -CLAMP), CLAMP)
            row.append(term + beta * (math.exp(lr) - lr - 1))
        rows.append(row)
    if aggregation == "grpo":
        return sum(sum(r) / max(len(r), 1) for r in rows)
    return sum(sum(r) for r in rows)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate"])
def test_weighted_policy_loss_values_and_gradients(mode, aggregation):
    """policy_loss(is_weight=w) weighs the policy term (not the KL term) of every token: value and d/d logp against
    float64 finite differences; no gradient reaches the weights."""
    trainer, sampler, mask = make_logps(1)
    rng = np.random.default_rng(2)
    logp = np.where(mask > 0, trainer, 0.0).astype(np.float32)
    old = np.where(mask > 0, logp + rng.normal(0, 0.3, logp.shape), 0.0).astype(np.float32)
    ref = np.where(mask > 0, logp + rng.normal(0, 0.3, logp.shape), 0.0).astype(np.float32)
    adv = np.array([1.2, -0.8, 0.5, -1.5, 0.3], np.float32)
    weight = np.asarray(losses.sampler_importance_weights(trainer, sampler, mask, mode, clip_min=0.3, clip_max=2.0))
    beta = 0.1

    def objective(lp, w):
        s, _, _ = losses.policy_loss(lp, old, adv, mask, ref_logp=ref, beta=beta, aggregation=aggregation, is_weight=w)
        return s

    value, (grad, grad_w) = jax.value_and_grad(objective, argnums=(0, 1))(logp, weight)
    args = (
        old.astype(np.float64),
        adv.astype(np.float64),
        mask,
        weight.astype(np.float64),
        ref.astype(np.float64),
        beta,
        aggregation,
    )
    np.testing.assert_allclose(float(value), reference_loss(logp.astype(np.float64), *args), rtol=1e-5)
    h = 1e-6
    for i, t in zip(*np.nonzero(mask)):
        up, down = logp.astype(np.float64), logp.astype(np.float64)
        up[i, t] += h
        down[i, t] -= h
        want = (reference_loss(up, *args) - reference_loss(down, *args)) / (2 * h)
        np.testing.assert_allclose(float(grad[i, t]), want, rtol=1e-3, atol=1e-5)
    assert not np.asarray(grad_w).any()
    # Weight 1 everywhere is the unweighted loss.
    ones = np.ones_like(weight)
    np.testing.assert_allclose(
        float(objective(logp, ones)),
        float(losses.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, aggregation=aggregation)[0]),
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------------------------------------
# config keys
# ----------------------------------------------------------------------------------------------------------


def test_config_keys_resolve_for_grpo_and_dyme():
    loss = dict(old_logp="recompute", sampler_correction="sequence_mask", sampler_correction_min=0.2)
    for mode in ("grpo", "dyme"):
        (s,) = configuration.resolve(rl_config(mode, **loss)).stages
        assert (s.loss.old_logp, s.loss.sampler_correction) == ("recompute", "sequence_mask")
        assert (s.loss.sampler_correction_min, s.loss.sampler_correction_max) == (0.2, 3.0)


@pytest.mark.parametrize(
    "loss, key",
    [
        (dict(old_logp="vllm"), "old_logp"),
        (dict(old_logp="recompute", sampler_correction="tis"), "sampler_correction"),
        (dict(sampler_correction="token_truncate"), "sampler_correction"),  # needs the trainer's log-probs
        (dict(old_logp="recompute", sampler_correction_max=2.0), "sampler_correction_max"),  # read by no correction
        (
            dict(old_logp="recompute", sampler_correction="token_mask", sampler_correction_min=3.0),
            "sampler_correction_min",
        ),
        (
            dict(old_logp="recompute", sampler_correction="token_mask", sampler_correction_max=0.0),
            "sampler_correction_max",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_bad_config_keys_are_refused_by_key(loss, key):
    with pytest.raises(checks.FieldError, match=rf"^{key}: "):
        train_steps.LossConfig(**loss).validate()
    with pytest.raises(ConfigError, match=rf"^config\.stages\.grpo\.loss\.{key}: "):
        configuration.resolve(rl_config(**loss))


# ----------------------------------------------------------------------------------------------------------
# the real sampler against the trainer, and the GRPO step in both modes
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def sampled_rows(dtype="float32"):
    """Rollouts of the tiny decoder (2 layers, no vision tower, `dtype` compute) from the KV-cache sampler, as
    `[K=1, M=1, R, ...]` GRPO rows with the sampler's old_logp and some advantages; the model and params."""
    tiny = models.preset("tiny")
    cfg = tiny.replace(
        model_type="qwen2", vision=None, dtype=dtype, text=dataclasses.replace(tiny.text, num_hidden_layers=2)
    )
    model = Qwen25VL(cfg)
    params = models.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    lengths = [5, 9, 7]
    ids = np.zeros((3, 9), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 9 - n :] = rng.integers(0, 280, n)
        mask[i, 9 - n :] = 1
    prompts = dict(input_ids=ids, attention_mask=mask)
    sp = sampling.SamplingParams(num_generations=2, max_new_tokens=10, temperature=0.9, stop_token_ids=[11, 12])
    rollout = sampling.generate(model, params, prompts, jax.random.key(3), sp)
    rows = sampling.update_rows(sampling.prepare_prompts(cfg, prompts), jax.tree.map(np.asarray, rollout), 2)
    rows["advantages"] = np.array([1.0, -1.0, 0.5, -0.5, 0.8, -0.8], np.float32)
    return {k: v[None, None] if k != "position_ids" else v[None, None] for k, v in rows.items()}, model, params


def teacher_forced(model, params, batch, temperature):
    micro = jax.tree.map(lambda x: x[0, 0], batch)
    return np.asarray(
        jax.jit(functools.partial(train_steps.completion_logprobs, model, temperature=temperature))(params, micro)
    )


def test_sampler_and_trainer_agree_in_float32():
    """The KV-cache sampler's log-probs of its own tokens equal the trainer's teacher-forced log-probs (the
    position-chunked LM head, one forward over prompt + completion) to float32 rounding."""
    batch, model, params = sampled_rows()
    mask = batch["completion_mask"][0, 0]
    assert mask.sum() > 10
    trainer = teacher_forced(model, params, batch, 0.9)
    got = losses.mismatch_summary(losses.sampler_mismatch(trainer, batch["old_logp"][0, 0], mask))
    assert float(got["mismatch/logp_abs_mean"]) < 1e-5, got  # ~1e-7 measured
    assert float(got["mismatch/logp_abs_max"]) < 1e-4, got
    assert float(got["mismatch/ratio_outside_fraction"]) == 0


def grpo_run(batch, model, params, **loss):
    state, step = grpo_step_on(model, params, train_steps.LossConfig(temperature=0.9, **loss))
    _, metrics = step(state, batch)
    return {k: float(v) for k, v in metrics.items()}


def test_grpo_step_measures_the_mismatch_in_both_modes_and_applies_the_correction():
    """A sampler made to disagree with the trainer (its log-probs shifted by noise): both old-log-prob modes report
    the same mismatch as a direct computation; "recompute" uses the trainer's log-probs as pi_old (ratio 1 at the
    first update) and, with a correction, the loss is policy_loss weighted by the NumPy weights."""
    batch, model, params = sampled_rows()
    micro = jax.tree.map(lambda x: x[0, 0], batch)
    mask = micro["completion_mask"]
    trainer = teacher_forced(model, params, batch, 0.9)
    noise = np.random.default_rng(5).normal(0.0, 0.6, trainer.shape).astype(np.float32)
    sampler = np.where(mask > 0, trainer + noise, 0.0).astype(np.float32)
    batch = {**batch, "old_logp": sampler[None, None]}
    want = {k: float(v) for k, v in losses.mismatch_summary(losses.sampler_mismatch(trainer, sampler, mask)).items()}
    assert want["mismatch/ratio_outside_fraction"] > 0

    plain = grpo_run(batch, model, params)
    corrected = grpo_run(
        batch, model, params, old_logp="recompute", sampler_correction="token_mask", sampler_correction_max=1.5
    )
    for name, value in want.items():
        np.testing.assert_allclose(plain[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(corrected[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert abs(plain["ratio_mean"] - 1) > 1e-3  # the sampler's pi_old: the ratio carries the mismatch
    np.testing.assert_allclose(corrected["ratio_mean"], 1.0, atol=1e-5)  # the trainer's: ratio 1 at mu = 1
    np.testing.assert_allclose(corrected["ratio_max"], 1.0, atol=1e-5)

    weight = reference_weights(trainer, sampler, mask, "token_mask", 0.0, 1.5).astype(np.float32)
    loss_sum, norm, _ = losses.policy_loss(trainer, trainer, micro["advantages"], mask, is_weight=weight)
    np.testing.assert_allclose(corrected["loss"], float(loss_sum) / float(norm), rtol=1e-4, atol=1e-6)
    valid = mask > 0
    np.testing.assert_allclose(corrected["sampler_correction/zeroed_fraction"], np.mean(weight[valid] == 0), atol=1e-6)
    np.testing.assert_allclose(corrected["sampler_correction/weight_mean"], weight[valid].mean(), rtol=1e-5)
    assert 0 < corrected["sampler_correction/zeroed_fraction"] < 1
    assert not any(k.startswith("sampler_correction/") for k in plain)
