"""SFT / GRPO / DyME steps: exact accumulation, optimizer options, DyME switching, non-finite skips, sharding."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import losses, models, sharding, train_steps
from jaxvlm.models.qwen2_5_vl import Qwen25VL
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.processing.vision import layout_images

CFG = models.preset("tiny")
MODEL = Qwen25VL(CFG)
GRID = np.array([[1, 4, 4]])  # one image: 16 patches, 4 merged tokens


@functools.cache
def base_params():
    return models.init_params(CFG, 0)


def policy_batch(lead, b, t=10, n=6, seed=0, image=True, group_size=2):
    """Random prompt+completion batch with leading axes `lead`; row 0 of every micro-batch holds an image."""
    rng = np.random.default_rng(seed)
    m = int(np.prod(lead))
    out = {k: [] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "position_ids")}
    pixels, vis = [], []
    for _ in range(m):
        p_ids = rng.integers(0, 900, (b, t))
        p_mask = np.ones((b, t), np.int64)
        for row in range(b):  # left padding of varying length
            pad = int(rng.integers(0, 4))
            p_ids[row, :pad], p_mask[row, :pad] = 0, 0
        if image:
            p_ids[0, 3:7] = CFG.image_token_id
            p_mask[0, :3] = 1
        c_ids = rng.integers(0, 900, (b, n))
        c_len = rng.integers(1, n + 1, b)
        c_mask = (np.arange(n)[None] < c_len[:, None]).astype(np.int64)
        ids, mask = np.concatenate([p_ids, c_ids], 1), np.concatenate([p_mask, c_mask], 1)
        pos, _ = get_rope_index(
            ids, mask, GRID if image else None, image_token_id=CFG.image_token_id, spatial_merge_size=2
        )
        for k, v in zip(out, (p_ids, p_mask, c_ids, c_mask, pos)):
            out[k].append(v.astype(np.int32))
        if image:
            slotted, inputs = layout_images(
                rng.standard_normal((16, CFG.vision.patch_dim)).astype(np.float32), GRID, CFG.vision, slot_multiple=8
            )  # slots split over up to 8 devices
            pixels.append(slotted)
            vis.append(inputs)
    batch = {k: np.stack(v).reshape(*lead, *v[0].shape) for k, v in out.items()}
    if image:
        batch["pixel_values"] = np.stack(pixels).reshape(*lead, *pixels[0].shape)
        batch["vision_inputs"] = jax.tree.map(lambda *xs: np.stack(xs).reshape(*lead, *xs[0].shape), *vis)
    rows = (*lead, b)
    batch["advantages"] = rng.standard_normal(rows).astype(np.float32)
    batch["old_logp"] = (-rng.uniform(0.5, 8, (*rows, n))).astype(np.float32)
    return batch


def make_state(opt_cfg=train_steps.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)):
    params = jax.tree.map(jnp.array, base_params())
    optimizer = train_steps.make_optimizer(opt_cfg, params)
    return train_steps.create_train_state(params, optimizer, 0), optimizer, train_steps.learning_rate_schedule(opt_cfg)


def run(step_fn, state, batch, optimizer, schedule, cfg):
    fn = jax.jit(functools.partial(step_fn, model=MODEL, optimizer=optimizer, schedule=schedule, cfg=cfg))
    return fn(state, batch)


def max_tree_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------------------------------------


def test_sft_loss_is_masked_token_mean_nll():
    state, optimizer, schedule = make_state()
    batch = policy_batch((1,), 4)
    _, metrics = run(train_steps.sft_step, state, batch, optimizer, schedule, train_steps.LossConfig())
    mb = jax.tree.map(lambda x: x[0], batch)
    ids = np.concatenate([mb["prompt_ids"], mb["completion_ids"]], 1)
    mask = np.concatenate([mb["prompt_mask"], mb["completion_mask"]], 1)
    logits = MODEL.apply(
        {"params": base_params()},
        ids,
        mask,
        mb["pixel_values"],
        position_ids=mb["position_ids"],
        vision_inputs=mb["vision_inputs"],
    )
    t = mb["prompt_ids"].shape[1]
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)[:, t - 1 : -1]
    picked = np.take_along_axis(logp, mb["completion_ids"][..., None], -1)[..., 0]
    expected = -(picked * mb["completion_mask"]).sum() / mb["completion_mask"].sum()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gradient_accumulation_is_exact_for_sft(aggregation):
    """Two micro-batches of 4 rows give the loss and gradient of one batch of 8 (equal sizes for "sequence")."""
    cfg = train_steps.LossConfig(sft_aggregation=aggregation)
    one = policy_batch((1,), 8, image=False, seed=3)
    two = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[2:]) if x.ndim >= 2 and x.shape[1] == 8 else x, one)
    two["position_ids"] = one["position_ids"][0].reshape(3, 2, 4, -1).transpose(1, 0, 2, 3)
    loss_fn = functools.partial(train_steps.sft_loss_fn, model=MODEL, cfg=cfg)
    acc = jax.jit(functools.partial(train_steps.accumulate_gradients, loss_fn))
    g1, l1, _ = acc(base_params(), one)
    g2, l2, _ = acc(base_params(), two)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    assert max_tree_diff(g1, g2) < 1e-5 * scale


@pytest.mark.slow
def test_frozen_vision_tower_and_schedule():
    opt_cfg = train_steps.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=6, frozen=("^visual/",))
    state, optimizer, schedule = make_state(opt_cfg)
    assert [round(float(schedule(i)), 6) for i in (0, 1, 2, 6)] == [0.0, 0.005, 0.01, 0.0]
    batch = policy_batch((1,), 4)
    new, metrics = run(train_steps.sft_step, state, batch, optimizer, schedule, train_steps.LossConfig())
    new, metrics = run(train_steps.sft_step, new, batch, optimizer, schedule, train_steps.LossConfig())
    assert max_tree_diff(new.params["visual"], base_params()["visual"]) == 0
    assert max_tree_diff(new.params["language_model"], base_params()["language_model"]) > 0
    assert int(new.step) == 2 and float(metrics["learning_rate"]) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="match no parameter"):
        train_steps.make_optimizer(train_steps.OptimizerConfig(frozen=("^nothing/",)), base_params())


@pytest.mark.slow
def test_grpo_mu_iterations_update_k_times_mu_and_clip_binds():
    cfg = train_steps.LossConfig(num_iterations=3, eps_low=0.05, eps_high=0.05, group_size=2)
    state, optimizer, schedule = make_state(train_steps.OptimizerConfig(learning_rate=3e-2, total_steps=10))
    batch = policy_batch((2, 1), 4)
    # Start on-policy: old log-probs are the current policy's.
    logp = jax.vmap(jax.vmap(lambda mb: train_steps.completion_logprobs(MODEL, state.params, mb)))(
        {k: v for k, v in batch.items() if k not in ("advantages", "old_logp")}
    )
    batch["old_logp"] = np.asarray(logp)
    new, metrics = run(train_steps.grpo_step, state, batch, optimizer, schedule, cfg)
    assert int(new.step) == 6 and float(metrics["updates"]) == 6
    assert float(metrics["clip_region_fraction"]) > 0  # after the first pass the ratio leaves [0.95, 1.05]


@pytest.mark.slow
def test_nonfinite_update_is_skipped():
    cfg = train_steps.LossConfig()
    state, optimizer, schedule = make_state()
    batch = policy_batch((1, 1), 4)
    batch["advantages"][0, 0, 1] = np.nan
    new, metrics = run(train_steps.grpo_step, state, batch, optimizer, schedule, cfg)
    assert float(metrics["update_skipped"]) == 1 and int(new.step) == 0
    assert max_tree_diff(new.params, base_params()) == 0


# ----------------------------------------------------------------------------------------------------------
# DyME
# ----------------------------------------------------------------------------------------------------------


def test_dyme_plan_prompt_granularity():
    cfg = train_steps.LossConfig(group_size=3, dyme_granularity="prompt")
    acc = jnp.array([0, 0, 0, 1, 0, 1, 1, 1, 1], jnp.float32)  # none / some / all correct
    rewards = acc + jnp.array([0.5, 0.2, 0.1, 0.3, 0.0, 0.9, 1, 1, 1])
    plan = train_steps.dyme_plan(rewards, acc, cfg)
    assert plan["mode"].tolist() == [train_steps.MODE_MEMORIZE, train_steps.MODE_EXPLORE, train_steps.MODE_SKIP]
    assert plan["use_reference"].tolist() == [True, False, False] + [False] * 6
    grpo = losses.group_advantages(rewards, 3)
    np.testing.assert_allclose(plan["advantages"], [1, 0, 0, *np.asarray(grpo[3:6]), 0, 0, 0], rtol=1e-6)
    assert not bool(plan["sft_mode"])


def test_dyme_plan_batch_granularity():
    cfg = train_steps.LossConfig(group_size=2, dyme_granularity="batch", dyme_sft_threshold=0.5)
    rewards = jnp.array([0, 0, 1, 0, 1, 1.5], jnp.float32)
    sft = train_steps.dyme_plan(rewards, jnp.array([0, 0, 0, 0, 1, 1.0]), cfg)  # 2 of 3 groups none correct
    assert bool(sft["sft_mode"]) and sft["use_reference"].tolist() == [True, False, True, False, True, False]
    assert sft["advantages"].tolist() == [1, 0, 1, 0, 1, 0]
    rl = train_steps.dyme_plan(rewards, jnp.array([0, 0, 1, 0, 1, 1.0]), cfg)  # 1 of 3: below the threshold
    assert not bool(rl["sft_mode"]) and not rl["use_reference"].any()
    assert rl["advantages"][4:].tolist() == [0, 0]  # all-correct group
    np.testing.assert_allclose(rl["advantages"][2:4], losses.group_advantages(rewards, 2)[2:4])


def dyme_batch(acc, seed=0):
    batch = policy_batch((1, 1), 4, seed=seed)
    rng = np.random.default_rng(seed + 1)
    n = batch["completion_ids"].shape[-1]
    del batch["advantages"]
    batch["accuracy"] = np.asarray(acc, np.float32).reshape(1, 1, 4)
    batch["rewards"] = batch["accuracy"] + rng.uniform(0, 0.5, (1, 1, 4)).astype(np.float32)
    batch["reference_ids"] = np.repeat(rng.integers(0, 900, (1, 1, 2, n)), 2, axis=2).astype(np.int32)
    batch["reference_mask"] = np.ones((1, 1, 4, n), np.int32)
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["prompt", "batch"])
def test_dyme_step_compiles_once_and_memorize_rows_are_sft(granularity):
    cfg = train_steps.LossConfig(group_size=2, dyme_granularity=granularity)
    state, optimizer, schedule = make_state()
    fn = jax.jit(functools.partial(train_steps.dyme_step, model=MODEL, optimizer=optimizer, schedule=schedule, cfg=cfg))
    _, m_mem = fn(state, dyme_batch([0, 0, 0, 0]))  # both groups none correct: pure memorisation
    _, m_mix = fn(state, dyme_batch([1, 0, 1, 1]))
    assert fn._cache_size() == 1  # the mode is data, not Python control flow
    assert float(m_mem["dyme/memorize_fraction"]) == 1 and float(m_mix["dyme/skip_fraction"]) == 0.5
    # Memorisation rows: the gradient is that of the per-sequence NLL of the references (rows 0 and 2), over all 4
    # rows ("prompt": the authors' denominator) or over the 2 reference rows ("batch": SFT on the references).
    batch = dyme_batch([0, 0, 0, 0])
    mb = jax.tree.map(lambda x: x[0, 0], batch)
    mb["completion_ids"], mb["completion_mask"] = mb.pop("reference_ids"), mb.pop("reference_mask")
    mb["advantages"] = np.array([1, 0, 1, 0], np.float32)
    mb["on_policy"] = np.array([True, False, True, False])
    if granularity == "batch":
        mb["sft_mode"] = np.bool_(True)
    del mb["rewards"], mb["accuracy"]

    def dyme_loss(p):
        loss_sum, (norm, _) = train_steps.grpo_loss_fn(p, mb, model=MODEL, cfg=cfg)
        return loss_sum / norm

    def reference_nll(p):
        logp = train_steps.completion_logprobs(MODEL, p, mb)
        seq = -(logp * mb["completion_mask"]).sum(1) / mb["completion_mask"].sum(1)
        return (seq[0] + seq[2]) / (4 if granularity == "prompt" else 2)

    g_dyme, g_ref = jax.grad(dyme_loss)(state.params), jax.grad(reference_nll)(state.params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
    assert scale > 0 and max_tree_diff(g_dyme, g_ref) < 1e-5 * scale
    if granularity == "batch":  # the loss value is the SFT loss itself
        np.testing.assert_allclose(float(m_mem["loss"]), float(reference_nll(state.params)), rtol=1e-5)
    else:  # the surrogate's value is -A * ratio = -1 per reference row, averaged over the 4 rows
        np.testing.assert_allclose(float(m_mem["loss"]), -0.5, rtol=1e-6)
    # ... so the step reports the reference rows' token NLL separately (sum and count: exact over micro-batches).
    logp = train_steps.completion_logprobs(MODEL, state.params, mb)
    ref = mb["completion_mask"] * mb["on_policy"][:, None]
    np.testing.assert_allclose(
        float(m_mem["reference_nll_sum"] / m_mem["reference_tokens_sum"]),
        float(-(logp * ref).sum() / ref.sum()),
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------------------


def test_every_parameter_has_a_rule_and_splits_where_it_should():
    mesh = sharding.make_mesh((2, 2, 2))
    specs = sharding.describe(sharding.tree_shardings(base_params(), mesh))
    assert specs["language_model/layers/self_attn/q_proj/kernel"] == str(jax.P(None, "fsdp", "tensor"))
    assert specs["language_model/embed_tokens/embedding"] == str(jax.P("tensor", "fsdp"))
    assert specs["language_model/layers/mlp/down_proj/kernel"] == str(jax.P(None, "tensor", "fsdp"))
    assert specs["visual/blocks/attn/qkv/kernel"] == str(jax.P(None, "fsdp", "tensor"))
    assert specs["language_model/norm/scale"] == str(jax.P(None))
    odd = sharding.spec_for("language_model/layers/mlp/up_proj/kernel", (2, 64, 7), mesh)
    assert odd == jax.P(None, "fsdp", None)  # 7 is not divisible by tensor=2: replicated on that dim
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((2, 2, 4))


@functools.cache
def steps_on_mesh(shape):
    """An SFT step then a GRPO step (μ = 2, two mini-batches) on a mesh of `shape`: (params, metrics) on the host."""
    return run_steps_on_mesh(shape, make_state(), MODEL, "kernel")


def run_steps_on_mesh(shape, state_optimizer_schedule, model, split_leaf: str):
    """`steps_on_mesh` from a given (state, optimizer, schedule) and model; asserts that the up projection's
    `split_leaf` (its kernel, or a LoRA adapter) ends up split over every device of the mesh."""
    mesh = sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
    state, optimizer, schedule = state_optimizer_schedule
    state_sh = train_steps.state_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    out = {}
    for step_fn, lead, batch in (
        (train_steps.sft_step, 1, policy_batch((2,), 8, seed=5)),
        (train_steps.grpo_step, 2, policy_batch((1, 2), 8, seed=6)),
    ):
        fn, batch_sh = train_steps.jit_step(
            step_fn,
            mesh,
            state_sh,
            batch,
            lead,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            cfg=train_steps.LossConfig(num_iterations=2),
        )
        state, metrics = fn(state, jax.device_put(batch, batch_sh))
        out[step_fn.__name__] = jax.device_get(metrics)
    leaf = state.params["language_model"]["layers"]["mlp"]["up_proj"][split_leaf]
    assert len(leaf.sharding.device_set) == int(np.prod(shape))
    return jax.device_get(state.params), out


# CI: the (2, 2, 2) mesh, which splits data, fsdp and tensor at once; JAXVLM_FULL_TESTS=1 adds pure data and
# data x fsdp meshes.
SHARDED_MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)] if os.environ.get("JAXVLM_FULL_TESTS") else [(2, 2, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", SHARDED_MESHES)
def test_sharded_steps_match_single_device(mesh_shape):
    assert jax.device_count() >= 8, "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    single, sharded = steps_on_mesh((1, 1, 1)), steps_on_mesh(mesh_shape)
    # Parameters are compared relative to how far the three Adam updates moved them: Adam divides by sqrt(v), so
    # a float32 reduction-order difference in a near-zero gradient becomes an update difference of ~1e-5 (seen
    # on CI at lr 1e-3); a sharding bug moves parameters by a sizeable fraction of the update.
    moved = max_tree_diff(single[0], jax.device_get(base_params()))
    assert moved > 1e-4
    assert max_tree_diff(single[0], sharded[0]) < 2e-2 * moved
    for step, values in single[1].items():
        for key, value in values.items():
            np.testing.assert_allclose(sharded[1][step][key], value, atol=1e-5, rtol=1e-5, err_msg=f"{step}/{key}")


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights():
    """dtype=bfloat16, param_dtype=float32: the step computes in bf16, updates fp32 params, and its loss agrees
    with the float32 step to bf16 precision."""
    model16 = Qwen25VL(CFG.replace(dtype="bfloat16"))
    batch = policy_batch((1,), 4, seed=9)
    losses_by_dtype = {}
    for name, model in (("float32", MODEL), ("bfloat16", model16)):
        state, optimizer, schedule = make_state()
        fn = jax.jit(
            functools.partial(
                train_steps.sft_step, model=model, optimizer=optimizer, schedule=schedule, cfg=train_steps.LossConfig()
            )
        )
        new, metrics = fn(state, batch)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.opt_state) if hasattr(x, "dtype") and x.ndim)
        losses_by_dtype[name] = float(metrics["loss"])
    assert np.isfinite(losses_by_dtype["bfloat16"])
    assert abs(losses_by_dtype["bfloat16"] - losses_by_dtype["float32"]) < 0.05 * abs(losses_by_dtype["float32"])


@pytest.mark.slow
@pytest.mark.parametrize("remat, tied", [("none", True), ("full", False)])
def test_chunked_lm_head_equals_the_whole_head(remat, tied):
    """Log-probs and entropy over position chunks (4 of 6 completion tokens: one padded chunk) and vocabulary chunks
    (1024 entries in 3 chunks of 342: the last one padded) equal the one-shot head, values and gradients."""
    cfg = CFG.replace(tie_word_embeddings=tied, remat=remat)
    params = models.init_params(cfg, 3)
    whole = Qwen25VL(cfg.replace(logits_chunk=1024, vocab_chunk=4096))
    chunked = Qwen25VL(cfg.replace(logits_chunk=4, vocab_chunk=400))
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), policy_batch((1,), 3, seed=4))
    cotangents = jax.random.normal(jax.random.key(0), (2, *mb["completion_ids"].shape))

    def weighted(model, p):
        logp, entropy = train_steps.completion_logprobs(model, p, mb, temperature=0.7, with_entropy=True)
        return jnp.sum(logp * cotangents[0]) + jnp.sum(entropy * cotangents[1]), (logp, entropy)

    (_, (logp, ent)), grads = jax.jit(jax.value_and_grad(functools.partial(weighted, whole), has_aux=True))(params)
    (_, (logp_c, ent_c)), grads_c = jax.jit(jax.value_and_grad(functools.partial(weighted, chunked), has_aux=True))(
        params
    )
    np.testing.assert_allclose(logp_c, logp, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ent_c, ent, atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(logp).max()) > 1.0
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    assert max_tree_diff(grads, grads_c) < 1e-5 * scale
