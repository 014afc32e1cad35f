"""CISPO and SAPO (`losses.policy_loss(surrogate=...)`) against NumPy references written here from TRL 1.16's code
(trl/trainer/grpo_trainer.py, `GRPOTrainer._compute_loss`):

    cispo   clamped_ratios = torch.clamp(coef_1, max=self.epsilon_high).detach()
            per_token_loss = -clamped_ratios * advantages * per_token_logps
    sapo    temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
            soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
            per_token_loss = -soft_coef_1 * advantages

with coef_1 = exp(log-ratio) per token or, for importance "sequence", exp(the row's masked mean log-ratio). Values,
metrics and gradients (finite differences of the float64 reference), every aggregation, with and without a KL term;
the on-policy gradient; the static and config checks; one GRPO step with each surrogate on the tiny model."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

from jaxvlm import checks, configuration, losses, models, train_steps
from jaxvlm.configuration import ConfigError, base_config, gym_source, stage
from jaxvlm.models.qwen2_5_vl import Qwen25VL
from jaxvlm.processing.rope import get_rope_index

CLAMP = 20.0  # losses.policy_loss's default log_ratio_clamp
EPS_MAX = 1.5  # a CISPO cap that the test ratios straddle
TAU_POS, TAU_NEG = 0.7, 2.5  # SAPO temperatures far enough apart that using the wrong one shows


# ----------------------------------------------------------------------------------------------------------
# the NumPy reference (float64 loops over the completion tokens)
# ----------------------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def reference(logp, weight_logp, batch, *, surrogate, importance, aggregation, beta=0.0, kl_estimator="k3"):
    """(loss_sum, normalizer, metrics) of the surrogate, as `losses.policy_loss` defines the (sum, normalizer) split.

    `weight_logp` is what CISPO's stop-gradient weight is computed from: equal to `logp` in value, but held fixed
    when the reference is differentiated by finite differences in `logp` (that is what the stop-gradient means)."""
    old, adv = (np.asarray(batch[k], np.float64) for k in ("old_logp", "advantages"))
    ref_logp = None if batch.get("ref_logp") is None else np.asarray(batch["ref_logp"], np.float64)
    mask = batch["mask"]
    num_rows, width = logp.shape
    rows, ratios, capped, capped_pos, gates, kls = [], [], 0, 0, [], []
    for i in range(num_rows):
        tokens = [t for t in range(width) if mask[i, t] != 0]
        log_ratio = [min(max(logp[i, t] - old[i, t], -CLAMP), CLAMP) for t in tokens]
        weight_log_ratio = [min(max(weight_logp[i, t] - old[i, t], -CLAMP), CLAMP) for t in tokens]
        n = max(len(tokens), 1)
        row = []
        for k, t in enumerate(tokens):
            if importance == "token":
                r, w = math.exp(log_ratio[k]), math.exp(weight_log_ratio[k])
            else:
                r, w = math.exp(sum(log_ratio) / n), math.exp(sum(weight_log_ratio) / n)
            if surrogate == "cispo":
                loss = -min(w, EPS_MAX) * adv[i] * logp[i, t]
                capped += r > EPS_MAX
                capped_pos += r > EPS_MAX and adv[i] > 0
            else:
                tau = TAU_POS if adv[i] > 0 else TAU_NEG
                gate = sigmoid(tau * (r - 1.0))
                loss = -gate * 4.0 / tau * adv[i]
                gates.append(4.0 * gate * (1.0 - gate))
            if ref_logp is not None:
                lr = min(max(ref_logp[i, t] - logp[i, t], -CLAMP), CLAMP)
                kl = {"k1": -lr, "k2": lr * lr / 2, "k3": math.exp(lr) - lr - 1}[kl_estimator]
                kls.append(kl)
                loss += beta * kl
            row.append(loss)
            ratios.append(r)
        rows.append(row)
    tokens = sum(len(r) for r in rows)
    total = sum(sum(r) for r in rows)
    if aggregation == "grpo":
        loss_sum, norm = sum(sum(r) / max(len(r), 1) for r in rows), num_rows
    elif aggregation == "bnpo":
        loss_sum, norm = total / max(tokens, 1), 1
    elif aggregation == "dr_grpo":
        loss_sum, norm = total, num_rows * width
    else:
        loss_sum, norm = total, tokens
    n = max(tokens, 1)
    metrics = dict(
        ratio_min=min(ratios),
        ratio_mean=sum(ratios) / n,
        ratio_max=max(ratios),
        kl=sum(kls) / n,
        tokens=tokens,
        clip_low_fraction=0.0,
    )
    if surrogate == "cispo":
        metrics.update(
            clip_high_fraction=capped_pos / n, clip_region_fraction=capped_pos / n, cispo_capped_fraction=capped / n
        )
    else:
        metrics.update(clip_high_fraction=0.0, clip_region_fraction=0.0, sapo_gate_mean=sum(gates) / n)
    return loss_sum, norm, metrics


def reference_grad(batch, h=1e-6, **options) -> np.ndarray:
    """d loss_sum / d logp by central differences of the float64 reference; 0 on padding (never read)."""
    logp = batch["logp"].astype(np.float64)
    grad = np.zeros_like(logp)
    for i, t in zip(*np.nonzero(batch["mask"])):
        up, down = logp.copy(), logp.copy()
        up[i, t] += h
        down[i, t] -= h
        grad[i, t] = (reference(up, logp, batch, **options)[0] - reference(down, logp, batch, **options)[0]) / (2 * h)
    return grad


# ----------------------------------------------------------------------------------------------------------
# the kernel, jitted once per setting
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _value_and_grad(options: tuple):
    def objective(logp, rest):
        loss_sum, norm, metrics = losses.policy_loss(logp, **rest, **dict(options))
        return loss_sum, (norm, metrics)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def kernel(batch, **options):
    """(loss_sum, normalizer, metrics, d loss_sum / d logp) of losses.policy_loss."""
    rest = {k: v for k, v in batch.items() if k != "logp"}
    (loss_sum, (norm, metrics)), grad = _value_and_grad(tuple(sorted(options.items())))(batch["logp"], rest)
    return float(loss_sum), float(norm), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)


def make_batch(seed=0, ref=True):
    """6 rows x 7 tokens: advantages of both signs and 0, ratios from ~0.1 to ~10 (and one log-ratio past the
    clamp), one row without tokens; padding holds inf / NaN in every input."""
    rng = np.random.default_rng(seed)
    num_rows, width = 6, 7
    logp = -rng.exponential(1.0, (num_rows, width))
    old = logp + rng.normal(0.0, 0.9, (num_rows, width))
    old[0, 1] = logp[0, 1] - 25.0  # log-ratio 25: clamped to 20 (ratio e^20)
    old[3, 0] = logp[3, 0] - 0.8  # ratio 2.2 > EPS_MAX with A > 0
    old[0, 3] = logp[0, 3] - 0.2  # ratio 1.22 in (1, EPS_MAX) with A > 0
    lengths = np.array([7, 4, 5, 2, 6, 0])
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    batch = dict(
        logp=logp.astype(np.float32),
        old_logp=old.astype(np.float32),
        advantages=np.array([1.3, -0.7, 0.0, 2.1, -1.5, 0.4], np.float32),
        mask=mask,
    )
    if ref:
        batch["ref_logp"] = (logp + rng.normal(0.0, 0.5, (num_rows, width))).astype(np.float32)
    return batch


def with_garbage_padding(batch):
    padding = batch["mask"] == 0
    garbage = np.resize(np.array([np.inf, -np.inf, np.nan], np.float32), padding.shape)
    return {
        k: np.where(padding, garbage, v).astype(v.dtype) if k in ("logp", "old_logp", "ref_logp") else v
        for k, v in batch.items()
    }


SURROGATE_OPTIONS = {
    "cispo": dict(surrogate="cispo", cispo_eps_max=EPS_MAX),
    "sapo": dict(surrogate="sapo", sapo_temperature_pos=TAU_POS, sapo_temperature_neg=TAU_NEG),
}
# every aggregation with both importance levels; KL off, k3 or k1 (TRL's own combinations are cispo x dapo and
# sapo x grpo, token or sequence)
CASES = [
    ("grpo", "token", None),
    ("grpo", "sequence", "k3"),
    ("bnpo", "token", "k3"),
    ("bnpo", "sequence", None),
    ("dr_grpo", "token", "k1"),
    ("dr_grpo", "sequence", None),
    ("dapo", "token", None),
    ("dapo", "sequence", "k3"),
]


def test_the_batch_straddles_the_caps():
    """The ratios of make_batch sit on both sides of CISPO's cap and of SAPO's r = 1, for both advantage signs."""
    b = make_batch()
    valid = b["mask"] > 0
    r = np.exp(np.clip(b["logp"] - b["old_logp"], -CLAMP, CLAMP))[valid]
    a = np.broadcast_to(b["advantages"][:, None], b["mask"].shape)[valid]
    for sign in (a > 0, a < 0):
        assert np.any((r[sign] > EPS_MAX) & (r[sign] < 10)) and np.any((r[sign] < EPS_MAX) & (r[sign] > 1))
        assert np.any(r[sign] < 1)
    assert np.any(a == 0) and r.max() == pytest.approx(math.exp(CLAMP), rel=1e-5)


@pytest.mark.parametrize("aggregation, importance, kl", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_matches_numpy_reference_values_and_gradients(surrogate, aggregation, importance, kl):
    batch = make_batch(ref=kl is not None)
    beta = 0.0 if kl is None else 0.3
    options = dict(importance=importance, aggregation=aggregation, max_completion_length=batch["mask"].shape[1])
    options.update(SURROGATE_OPTIONS[surrogate], beta=beta, kl_estimator=kl or "k3")
    loss_sum, norm, metrics, grad = kernel(batch, **options)

    ref_options = dict(surrogate=surrogate, importance=importance, aggregation=aggregation, beta=beta)
    ref_options["kl_estimator"] = kl or "k3"
    logp64 = batch["logp"].astype(np.float64)
    want_sum, want_norm, want_metrics = reference(logp64, logp64, batch, **ref_options)
    np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-5, atol=1e-6)
    assert norm == want_norm
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    want_grad = reference_grad(batch, **ref_options)
    assert np.abs(want_grad).max() > 1e-2  # the gradient is not trivially zero
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=2e-6)

    # inf / NaN in the padding of every input changes nothing, bit for bit, and no gradient reaches it
    d_sum, d_norm, d_metrics, d_grad = kernel(with_garbage_padding(batch), **options)
    assert (d_sum, d_norm, d_metrics) == (loss_sum, norm, metrics)
    np.testing.assert_array_equal(d_grad, grad)
    assert np.all(d_grad[batch["mask"] == 0] == 0)


def test_cispo_capped_tokens_keep_a_gradient_the_clip_drops():
    """One token, A > 0, ratio 3 > the caps: the clip gives it no gradient; CISPO gives -min(r, eps_max) A."""
    batch = dict(
        logp=np.full((1, 1), math.log(3.0) - 1.0, np.float32),
        old_logp=np.full((1, 1), -1.0, np.float32),
        advantages=np.array([2.0], np.float32),
        mask=np.ones((1, 1), np.int32),
    )
    _, _, clip_metrics, clip_grad = kernel(batch, surrogate="clip")
    assert clip_grad[0, 0] == 0 and clip_metrics["clip_region_fraction"] == 1
    value, _, metrics, grad = kernel(batch, surrogate="cispo", cispo_eps_max=EPS_MAX)
    assert value == pytest.approx(-EPS_MAX * 2.0 * (math.log(3.0) - 1.0), rel=1e-6)
    assert grad[0, 0] == pytest.approx(-EPS_MAX * 2.0, rel=1e-6)
    assert metrics["cispo_capped_fraction"] == 1 and metrics["clip_region_fraction"] == 1
    batch["advantages"] = -batch["advantages"]  # capped, but TRL's cispo_clip_ratio counts A > 0 only
    _, _, metrics, grad = kernel(batch, surrogate="cispo", cispo_eps_max=EPS_MAX)
    assert grad[0, 0] == pytest.approx(EPS_MAX * 2.0, rel=1e-6)
    assert metrics["cispo_capped_fraction"] == 1 and metrics["clip_region_fraction"] == 0


@pytest.mark.parametrize(
    "options, scale",
    [
        (dict(surrogate="cispo"), 1.0),  # TRL's recommended cap 5 >= 1: the weight is 1 on policy
        (dict(surrogate="cispo", cispo_eps_max=0.5), 0.5),  # a cap below 1 scales the on-policy gradient
        (dict(surrogate="sapo"), 1.0),
        (dict(surrogate="sapo", sapo_temperature_pos=0.3, sapo_temperature_neg=4.0), 1.0),  # slope 1 at r = 1
    ],
    ids=["cispo", "cispo_cap_below_1", "sapo", "sapo_other_temperatures"],
)
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_on_policy_gradient_is_minus_advantage_grad_logp(options, scale, importance):
    """old = stop_gradient(logp): the gradient is -scale A d logp (token mean per row under "grpo")."""
    batch = make_batch(ref=False)
    batch.pop("old_logp")
    mask = batch["mask"].astype(np.float64)
    adv = batch["advantages"].astype(np.float64)

    def objective(logp):
        loss_sum, norm, _ = losses.policy_loss(
            logp,
            jax.lax.stop_gradient(logp),
            batch["advantages"],
            batch["mask"],
            importance=importance,
            **options,
        )
        return loss_sum / norm, loss_sum

    grad, loss_sum = jax.jit(jax.grad(objective, has_aux=True))(batch["logp"])
    lengths = np.maximum(mask.sum(1, keepdims=True), 1)
    want = -scale * adv[:, None] * mask / lengths / mask.shape[0]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    # the values at r = 1: CISPO -A logp, SAPO -(4 / tau) sigmoid(0) A = -2 A / tau
    logp = np.where(mask > 0, batch["logp"], 0.0)
    if options["surrogate"] == "cispo":
        token_value = -min(1.0, options.get("cispo_eps_max", 5.0)) * adv[:, None] * logp
    else:
        tau = np.where(adv > 0, options.get("sapo_temperature_pos", 1.0), options.get("sapo_temperature_neg", 1.05))
        token_value = -2.0 * adv[:, None] / tau[:, None] * mask
    np.testing.assert_allclose(float(loss_sum), np.sum(np.sum(token_value, 1) / lengths[:, 0]), rtol=1e-5)


def test_bad_settings_raise_value_error_naming_the_argument():
    batch = make_batch(ref=False)
    bad = [
        (dict(surrogate="ppo"), "surrogate"),
        (dict(surrogate="sapo", sapo_temperature_pos=-1.0), "sapo_temperature_pos"),
        (dict(surrogate="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (dict(surrogate="cispo", cispo_eps_max=0.0), "cispo_eps_max"),
        (dict(surrogate="cispo", cispo_eps_max=float("nan")), "cispo_eps_max"),
        (dict(surrogate="cispo", delta=2.0), "delta"),
        (dict(surrogate="sapo", delta=2.0), "delta"),
    ]
    for options, name in bad:
        with pytest.raises(ValueError, match=name):
            losses.policy_loss(**batch, **options)


# ----------------------------------------------------------------------------------------------------------
# config keys
# ----------------------------------------------------------------------------------------------------------


def rl_config(mode="grpo", **loss):
    c = base_config()
    c.model.update(preset="tiny", path="")
    c.mesh.shape = (1, 1, 1)
    c.stage_order = (mode,)
    c.stages[mode] = stage(
        mode,
        steps=1,
        data=dict(sources=[gym_source("train", 8, tasks=("word_arithmetic",))], batch_size=2, prompt_style="plain"),
        rewards=[{"name": "accuracy", "kwargs": {"extract": "raw"}}],
        loss=loss,
        sampling=dict(num_generations=2, max_new_tokens=8),
    )
    return c


def test_config_keys_resolve_for_grpo_and_dyme():
    (s,) = configuration.resolve(rl_config(surrogate="cispo", cispo_eps_max=4)).stages
    assert (s.loss.surrogate, s.loss.cispo_eps_max) == ("cispo", 4.0)
    (s,) = configuration.resolve(rl_config("dyme", surrogate="sapo", sapo_temperature_neg=2.0)).stages
    assert (s.loss.surrogate, s.loss.sapo_temperature_pos, s.loss.sapo_temperature_neg) == ("sapo", 1.0, 2.0)


@pytest.mark.parametrize(
    "loss, key",
    [
        (dict(surrogate="ppo"), "surrogate"),
        (dict(surrogate="sapo", sapo_temperature_pos=-1.0), "sapo_temperature_pos"),
        (dict(surrogate="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (dict(surrogate="cispo", cispo_eps_max=0.0), "cispo_eps_max"),
        (dict(surrogate="cispo", eps_high=5.0), "eps_high"),  # TRL's name for the cap: refused, not ignored
        (dict(surrogate="sapo", eps_low=0.1), "eps_low"),
        (dict(surrogate="cispo", delta=2.0), "delta"),
        (dict(surrogate="clip", cispo_eps_max=3.0), "cispo_eps_max"),
        (dict(surrogate="cispo", sapo_temperature_pos=2.0), "sapo_temperature_pos"),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_bad_config_keys_are_refused_by_key(loss, key):
    with pytest.raises(checks.FieldError, match=rf"^{key}: "):
        train_steps.LossConfig(**loss).validate()
    with pytest.raises(ConfigError, match=rf"^config\.stages\.grpo\.loss\.{key}: "):
        configuration.resolve(rl_config(**loss))


# ----------------------------------------------------------------------------------------------------------
# one GRPO step on the tiny model
# ----------------------------------------------------------------------------------------------------------


def text_policy_batch(rows=4, prompt=6, completion=5, seed=0):
    """[K=1, M=1, rows, ...] text-only GRPO batch: random tokens, ragged completions (old_logp: set by the test),
    and the model: the tiny preset's decoder cut to one layer, without the vision tower (to compile fast)."""
    tiny = models.preset("tiny")
    cfg = tiny.replace(model_type="qwen2", vision=None, text=dataclasses.replace(tiny.text, num_hidden_layers=1))
    rng = np.random.default_rng(seed)
    p_ids = rng.integers(0, 900, (rows, prompt))
    p_mask = np.ones((rows, prompt), np.int64)
    p_mask[1, :2] = 0
    c_ids = rng.integers(0, 900, (rows, completion))
    c_mask = (np.arange(completion)[None] < np.array([5, 3, 1, 4])[:, None]).astype(np.int64)
    ids, mask = np.concatenate([p_ids, c_ids], 1), np.concatenate([p_mask, c_mask], 1)
    position_ids, _ = get_rope_index(ids, mask, None, image_token_id=cfg.image_token_id, spatial_merge_size=2)
    batch = dict(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        completion_ids=c_ids,
        completion_mask=c_mask,
        position_ids=position_ids,
        advantages=np.array([1.0, -1.0, 0.5, -0.5]),
    )
    dtypes = dict(advantages=np.float32)
    return {k: np.asarray(v, dtypes.get(k, np.int32))[None, None] for k, v in batch.items()}, cfg


@functools.cache
def step_problem():
    """(batch without old_logp, model, params, the model's completion log-probs [rows, N])."""
    batch, model_cfg = text_policy_batch()
    model = Qwen25VL(model_cfg)
    params = models.init_params(model_cfg, 0)
    micro = jax.tree.map(lambda x: x[0, 0], batch)
    logp = np.asarray(jax.jit(functools.partial(train_steps.completion_logprobs, model))(params, micro))
    return batch, model, params, logp


def grpo_step_on(model, params, cfg: train_steps.LossConfig):
    """(a fresh train state, the jitted grpo_step) for `model` with `cfg` (validated): AdamW at lr 1e-3, no weight
    decay, no warmup."""
    cfg.validate()
    opt_cfg = train_steps.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.0)
    optimizer = train_steps.make_optimizer(opt_cfg, params)
    step = functools.partial(
        train_steps.grpo_step,
        model=model,
        optimizer=optimizer,
        schedule=train_steps.learning_rate_schedule(opt_cfg),
        cfg=cfg,
    )
    return train_steps.create_train_state(params, optimizer, 0), jax.jit(step)


@pytest.mark.parametrize(
    "loss, metric",
    [
        (dict(surrogate="cispo", cispo_eps_max=1.2, aggregation="dapo"), "cispo_capped_fraction"),  # TRL's "cispo"
        (dict(surrogate="sapo", sapo_temperature_neg=2.0, aggregation="grpo"), "sapo_gate_mean"),  # TRL's "sapo"
    ],
    ids=["cispo", "sapo"],
)
def test_grpo_step_trains_with_each_surrogate(loss, metric):
    """grpo_step with the surrogate set in LossConfig: its first update's loss is policy_loss with that surrogate on
    the model's log-probs, the surrogate's metric is in range, and the weights move (no weight decay)."""
    batch, model, params, logp = step_problem()
    micro = jax.tree.map(lambda x: x[0, 0], batch)
    old = logp + np.random.default_rng(1).normal(0.0, 0.5, logp.shape).astype(np.float32)  # ratios around 1
    batch = {**batch, "old_logp": old[None, None]}
    state, step = grpo_step_on(model, params, train_steps.LossConfig(**loss))
    new, metrics = step(state, batch)
    assert int(new.step) == 1 and float(metrics["update_skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    kernel_fn = jax.jit(functools.partial(losses.policy_loss, **loss))
    loss_sum, norm, want = kernel_fn(logp, old, micro["advantages"], micro["completion_mask"])
    np.testing.assert_allclose(float(metrics["loss"]), float(loss_sum) / float(norm), rtol=1e-4, atol=1e-6)
    assert 0 < float(metrics[metric]) < 1
    np.testing.assert_allclose(float(metrics[metric]), float(want[metric]), rtol=1e-4, atol=1e-6)
    leaves = zip(jax.tree.leaves(new.params), jax.tree.leaves(params))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in leaves)
    assert moved > 0
