"""LoRA in training: fresh adapters are the base model exactly, steps train the adapters alone (optimizer state and
gradients adapter-sized), dropout, sharding rules, the 8-device mesh equivalence, bitwise resume from an
adapters-only checkpoint, and the trainer end to end (config key, KL reference, export). PEFT I/O and the
transformers + peft parity are in test_lora_peft.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from jaxvlm import configuration, models, sharding, train_steps, trainer
from jaxvlm.checkpoint import TrainCheckpointer, abstract_like
from jaxvlm.models import lora
from jaxvlm.models.config import LoraConfig
from test_train_checkpoint import assert_trees_equal
from test_train_steps import dyme_batch, policy_batch, run_steps_on_mesh

CFG = models.preset("tiny")
LORA = LoraConfig(rank=4, alpha=8.0)
LORA_CFG = CFG.replace(lora=LORA)
MODEL = models.build_model(LORA_CFG)


@functools.cache
def lora_params(random_b: bool = False):
    """Base weights of seed 0 with fresh adapters; `random_b`: B drawn too, so A gets gradients from step one."""
    params = models.init_params(LORA_CFG, 0)
    if not random_b:
        return params
    flat = lora.traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(7), len(flat))
    return lora.traverse_util.unflatten_dict(
        {
            path: 0.05 * jax.random.normal(key, v.shape, v.dtype) if path[-1] == "lora_b" else v
            for key, (path, v) in zip(keys, flat.items())
        }
    )


def make_state(params, opt_cfg=train_steps.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)):
    params = jax.tree.map(jnp.array, params)
    optimizer = train_steps.make_optimizer(opt_cfg, params)
    return train_steps.create_train_state(params, optimizer, 0), optimizer, train_steps.learning_rate_schedule(opt_cfg)


def sft(model, state, optimizer, schedule, batch):
    fn = functools.partial(
        train_steps.sft_step, model=model, optimizer=optimizer, schedule=schedule, cfg=train_steps.LossConfig()
    )
    return jax.jit(fn)(state, batch)


def ids(seed=0, shape=(2, 12)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 900, shape), jnp.int32)


@pytest.mark.parametrize(
    "preset, targets",
    [
        ("tiny", LoraConfig().targets),
        ("qwen3_vl_tiny", (r"^language_model/layers/", r"^visual/(blocks|merger|deepstack_merger_list)")),
    ],
)
def test_fresh_adapters_are_the_base_model_exactly_and_merging_changes_nothing(preset, targets):
    cfg = models.preset(preset)
    settings = LoraConfig(rank=4, alpha=8.0, targets=targets)
    base, adapted = models.init_params(cfg, 0), models.init_params(cfg.replace(lora=settings), 0)
    assert_trees_equal(lora.without_adapters(adapted), base)  # the base draws from the same key
    layers = lora.targeted_layers(base, settings)
    assert len(layers) == (7 if preset == "tiny" else 15)
    model, base_model = models.build_model(cfg.replace(lora=settings)), models.build_model(cfg)
    x = ids()
    expected = base_model.apply({"params": base}, x)
    np.testing.assert_array_equal(model.apply({"params": adapted}, x), expected)  # B = 0: exactly the base
    if preset == "qwen3_vl_tiny":  # the vision tower's adapters (blocks, merger, DeepStack mergers) too
        rng = np.random.default_rng(0)
        pixels = jnp.asarray(rng.standard_normal((16, cfg.vision.patch_dim)), jnp.float32)
        grid = np.array([[1, 4, 4]])
        np.testing.assert_array_equal(
            model.apply({"params": adapted}, pixels, grid, method="image_features"),
            base_model.apply({"params": base}, pixels, grid, method="image_features"),
        )
    # Random B: the adapters change the logits, and folding them into the kernels gives the same logits.
    trained = jax.tree_util.tree_map_with_path(
        lambda p, v: 0.1 * jnp.ones_like(v) if sharding.path_str(p).endswith("lora_b") else v, adapted
    )
    unmerged = model.apply({"params": trained}, x)
    assert float(jnp.abs(unmerged - expected).max()) > 1e-2
    merged = lora.merged(trained, settings)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(base_model.apply({"params": merged}, x), unmerged, atol=2e-5, rtol=1e-5)


def test_one_sft_step_changes_only_the_adapters_whose_optimizer_state_is_all_there_is():
    state, optimizer, schedule = make_state(lora_params())
    before = jax.device_get(state.params)
    new, metrics = sft(MODEL, state, optimizer, schedule, policy_batch((2,), 4, seed=1))
    assert metrics["update_skipped"] == 0 and float(metrics["grad_norm"]) > 0
    after = jax.device_get(new.params)
    assert_trees_equal(lora.without_adapters(after), lora.without_adapters(before))  # the base: bit for bit
    for path, b in lora.traverse_util.flatten_dict(after).items():
        if path[-1] == "lora_b":  # zero before; the gradient reaches B first (A's is B^T-weighted: zero)
            assert float(np.abs(b).max()) > 0, path
    # Adam's mu and nu: two adapter-sized trees, nothing base-sized.
    adapter_values = lora.num_adapter_params(before)
    state_values = sum(x.size for x in jax.tree.leaves(new.opt_state) if hasattr(x, "size") and x.ndim)
    assert state_values == 2 * adapter_values
    assert adapter_values < 0.05 * sum(x.size for x in jax.tree.leaves(before))


def test_a_bfloat16_base_trains_float32_adapters():
    """param_dtype=bfloat16 halves the frozen base; the adapters stay float32 master weights and train."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16", lora=LORA)
    params = models.init_params(cfg, 0)
    dtypes = {path[-1]: v.dtype for path, v in lora.traverse_util.flatten_dict(params).items()}
    assert dtypes["kernel"] == jnp.bfloat16 and dtypes["lora_a"] == dtypes["lora_b"] == jnp.float32
    state, optimizer, schedule = make_state(params)
    new, metrics = sft(models.build_model(cfg), state, optimizer, schedule, policy_batch((1,), 4, seed=8))
    assert metrics["update_skipped"] == 0 and np.isfinite(float(metrics["loss"]))
    assert_trees_equal(lora.without_adapters(new.params), lora.without_adapters(state.params))
    adapters = lora.adapters_of(new.params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    assert not lora.adapters_are_zero(adapters)


def test_grpo_and_dyme_steps_train_the_adapters_and_a_frozen_pattern_still_applies():
    state, optimizer, schedule = make_state(lora_params(random_b=True))
    fn = functools.partial(
        train_steps.grpo_step,
        model=MODEL,
        optimizer=optimizer,
        schedule=schedule,
        cfg=train_steps.LossConfig(num_iterations=2),
    )
    new, metrics = jax.jit(fn)(state, policy_batch((1, 2), 4, seed=2))
    assert metrics["updates"] == 2 and metrics["update_skipped"] == 0
    before, after = lora.traverse_util.flatten_dict(state.params), lora.traverse_util.flatten_dict(new.params)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed and all(lora.is_adapter(path) for path in changed)
    assert any(path[-1] == "lora_a" for path in changed)  # B is not zero here: A learns from the first update
    # DyME (memorisation rows spliced in, one group explored): the adapters alone move here too.
    dyme = functools.partial(
        train_steps.dyme_step,
        model=MODEL,
        optimizer=optimizer,
        schedule=schedule,
        cfg=train_steps.LossConfig(group_size=2),
    )
    new, metrics = jax.jit(dyme)(state, dyme_batch([0, 0, 1, 0]))
    assert float(metrics["dyme/memorize_fraction"]) == 0.5 and float(metrics["dyme/explore_fraction"]) == 0.5
    after = lora.traverse_util.flatten_dict(new.params)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed and all(lora.is_adapter(path) for path in changed)
    # optimizer.frozen matches adapters too: the MLP's adapters stay put, the attention's move.
    opt = train_steps.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, frozen=("mlp/",))
    state, optimizer, schedule = make_state(lora_params(random_b=True), opt)
    new, _ = sft(MODEL, state, optimizer, schedule, policy_batch((1,), 4, seed=3))
    after = lora.traverse_util.flatten_dict(new.params)
    changed = {"/".join(path) for path in before if not np.array_equal(before[path], after[path])}
    assert changed and all("self_attn" in path and path.endswith(("lora_a", "lora_b")) for path in changed)


def test_dropout_runs_in_the_training_loss_only():
    settings = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    model = models.build_model(CFG.replace(lora=settings))
    params = lora_params(random_b=True)
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), policy_batch((1,), 4, seed=4, image=False))
    plain = train_steps.completion_logprobs(MODEL, params, mb)
    np.testing.assert_array_equal(train_steps.completion_logprobs(model, params, mb), plain)  # no key: none
    dropped = train_steps.completion_logprobs(model, params, {**mb, "dropout_rng": jax.random.key(0)})
    again = train_steps.completion_logprobs(model, params, {**mb, "dropout_rng": jax.random.key(0)})
    other = train_steps.completion_logprobs(model, params, {**mb, "dropout_rng": jax.random.key(1)})
    np.testing.assert_array_equal(dropped, again)
    assert float(jnp.abs(dropped - plain).max()) > 1e-4 and float(jnp.abs(dropped - other).max()) > 1e-4
    state = make_state(params)[0]
    key0, key1 = (
        train_steps.dropout_rng(state, model),
        train_steps.dropout_rng(state.replace(step=state.step + 1), model),
    )
    assert not np.array_equal(jax.random.key_data(key0), jax.random.key_data(key1))
    assert train_steps.dropout_rng(state, MODEL) is None  # lora.dropout = 0: deterministic steps


def test_the_sampler_merges_the_adapters_and_scores_as_the_trainer_does():
    """Rollouts fold the adapters into the kernels once per call: same tokens as the merged model's, and the sampler's
    log-probs equal the training forward's (adapters unmerged, teacher-forced) to float32 noise."""
    from jaxvlm import sampling

    params = lora_params(random_b=True)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(10, 900, (2, 6)).astype(np.int32), "attention_mask": np.ones((2, 6), np.int32)}
    sp = sampling.SamplingParams(num_generations=2, max_new_tokens=5, temperature=1.0)
    rollout = sampling.generate(MODEL, params, batch, jax.random.key(3), sp)
    base = models.build_model(CFG)
    same = sampling.generate(base, lora.merged(params, LORA), batch, jax.random.key(3), sp)
    np.testing.assert_array_equal(rollout.tokens, same.tokens)
    rows = sampling.update_rows(sampling.prepare_prompts(CFG, batch), jax.device_get(rollout), 2)
    trainer_logp = train_steps.completion_logprobs(MODEL, params, rows)
    mask = rows["completion_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(trainer_logp)[mask], rows["old_logp"][mask], atol=1e-4)
    plain = train_steps.completion_logprobs(base, lora.without_adapters(params), rows)
    assert float(np.abs(np.asarray(plain) - np.asarray(trainer_logp))[mask].max()) > 1e-3  # the adapters matter


def test_adapters_are_split_like_their_kernels():
    mesh = sharding.make_mesh((2, 2, 2))
    specs = sharding.describe(sharding.tree_shardings(lora_params(), mesh))
    assert specs["language_model/layers/self_attn/q_proj/kernel"] == str(jax.P(None, "fsdp", "tensor"))
    assert specs["language_model/layers/self_attn/q_proj/lora_a"] == str(jax.P(None, "fsdp", None))
    assert specs["language_model/layers/self_attn/q_proj/lora_b"] == str(jax.P(None, None, "tensor"))
    assert specs["language_model/layers/mlp/down_proj/lora_a"] == str(jax.P(None, "tensor", None))
    assert specs["language_model/layers/mlp/down_proj/lora_b"] == str(jax.P(None, None, "fsdp"))
    state = jax.eval_shape(lambda p: make_state(p)[0], lora_params())
    opt_specs = sharding.describe(train_steps.state_shardings(state, mesh).opt_state)
    mu = [v for k, v in opt_specs.items() if k.endswith("mu/language_model/layers/mlp/down_proj/lora_b")]
    assert mu == [str(jax.P(None, None, "fsdp"))]


def lora_steps_on_mesh(shape):
    """test_train_steps' SFT then GRPO step (μ = 2) on a mesh of `shape`, with adapters: (params, metrics)."""
    return run_steps_on_mesh(shape, make_state(lora_params(random_b=True)), MODEL, "lora_a")


@pytest.mark.slow
def test_sharded_lora_steps_match_single_device():
    single, sharded = lora_steps_on_mesh((1, 1, 1)), lora_steps_on_mesh((2, 2, 2))
    start = jax.device_get(lora_params(random_b=True))
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(lora.adapters_of(single[0])), jax.tree.leaves(lora.adapters_of(start)))
    )
    assert moved > 1e-4
    assert_trees_equal(lora.without_adapters(sharded[0]), lora.without_adapters(start))
    diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(single[0]), jax.tree.leaves(sharded[0]))
    )
    assert diff < 2e-2 * moved
    for step, values in single[1].items():
        for key, value in values.items():
            np.testing.assert_allclose(sharded[1][step][key], value, atol=1e-5, rtol=1e-5, err_msg=f"{step}/{key}")


def test_bitwise_resume_from_a_checkpoint_of_the_adapters_alone(tmp_path):
    """2 SFT steps, save what the trainer saves (`trainer.checkpoint_tree`: adapters + their optimizer state), restore
    onto a fresh state (its base from the model again), 2 more steps == 4 uninterrupted steps, bit for bit."""
    batches = [policy_batch((1,), 4, seed=s) for s in range(4)]
    state, optimizer, schedule = make_state(lora_params())
    step = jax.jit(
        functools.partial(
            train_steps.sft_step, model=MODEL, optimizer=optimizer, schedule=schedule, cfg=train_steps.LossConfig()
        )
    )
    straight = state
    for batch in batches:
        straight, _ = step(straight, batch)
    resumed = state
    for batch in batches[:2]:
        resumed, _ = step(resumed, batch)
    with TrainCheckpointer(tmp_path / "ckpt", save_every=2) as ckpt:
        ckpt.save(2, trainer.checkpoint_tree(resumed, None))
    fresh = make_state(lora_params())[0]
    template = trainer.checkpoint_tree(fresh, None)
    assert not any(path[-1] == "kernel" for path in lora.traverse_util.flatten_dict(template["state"].params))
    with TrainCheckpointer(tmp_path / "ckpt", save_every=2) as ckpt:
        restored = ckpt.restore(abstract_like(template, SingleDeviceSharding(jax.devices()[0])))[0]["state"]
    resumed = restored.replace(params=trainer.with_base(restored.params, fresh.params))
    assert int(resumed.step) == 2
    for batch in batches[2:]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(resumed, straight)


# ----------------------------------------------------------------------------------------------------------
# Config and trainer
# ----------------------------------------------------------------------------------------------------------


def test_the_lora_section_resolves_and_refuses_what_nothing_would_read():
    c = configuration.base_config()
    assert configuration.resolve_model(c.model).overrides.get("lora") is None  # rank 0: off
    c.model.lora.rank = 16
    settings = configuration.resolve_model(c.model).overrides["lora"]
    assert settings == LoraConfig(rank=16, alpha=16.0) and settings.scale == 1.0
    c = configuration.base_config()
    c.model.lora.alpha = 32.0
    with pytest.raises(configuration.ConfigError, match=r"config\.model\.lora\.alpha: 32\.0 is read only with LoRA on"):
        configuration.resolve_model(c.model)
    c.model.lora.update(rank=8, targets=("(unclosed",))
    with pytest.raises(configuration.ConfigError, match=r"config\.model\.lora\.targets: .*not a regular expression"):
        configuration.resolve_model(c.model)
    for bad, message in (("^nothing/", "matches no linear layer"), (r"^lm_head$|q_proj", "cannot carry an adapter")):
        with pytest.raises(lora.LoraError, match=message):
            lora.targeted_layers(
                models.init_params(models.preset("tiny").replace(tie_word_embeddings=False)), LoraConfig(targets=(bad,))
            )


def lora_run_config():
    from test_trainer import sft_grpo_config

    c = sft_grpo_config()
    c.model.lora.update(rank=4, alpha=8.0)
    c.stages.grpo.loss.beta = 0.04
    return c


@pytest.mark.slow  # two SFT + GRPO runs with LoRA (~40 s on 2 cores)
def test_a_lora_run_resumes_exactly_anchors_its_kl_and_exports_adapter_and_merged_model(tmp_path):
    from test_trainer import StopAfter, read_metrics

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert trainer.run(lora_run_config(), str(whole))["finished"]
    # Stops in grpo after its first step: the resumed run restores the adapters onto the base and the KL reference's.
    assert not trainer.run(lora_run_config(), str(parts), stop=StopAfter(3))["finished"]
    assert trainer.run(lora_run_config(), str(parts))["finished"]
    runs = [[r for r in read_metrics(w) if "train/loss" in r] for w in (whole, parts)]
    assert [r["train/loss"] for r in runs[0]] == [r["train/loss"] for r in runs[1]]
    grpo = [r for r in runs[0] if r["train/stage"] == "grpo"]
    # The reference is the GRPO stage's starting policy (SFT-trained adapters on the base): at its first update the
    # policy is the reference, so the KL is zero up to float noise; the base alone would be KL > 0 by now.
    assert abs(grpo[0]["train/kl"]) < 1e-6
    # Exports: the merged model loads as a plain checkpoint; the PEFT adapter directory on the base the run started
    # from (the preset's seed-0 weights) gives the same logits, and its adapters have learned (B != 0).
    model, merged = models.load_pretrained(str(whole / "final_model"))
    adapted_cfg = model.config.replace(lora=LoraConfig(rank=4, alpha=8.0))
    start = lora.without_adapters(models.init_params(adapted_cfg, 0))
    rebuilt = lora.load_peft_adapter(str(whole / "final_adapter"), adapted_cfg, start)
    assert not lora.adapters_are_zero(rebuilt)
    x = ids(3)
    np.testing.assert_allclose(
        models.build_model(adapted_cfg).apply({"params": rebuilt}, x),
        model.apply({"params": merged}, x),
        atol=2e-5,
        rtol=1e-5,
    )
    # transformers + peft: the trained adapter directory on transformers' model of the same base gives our logits.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    models.save_pretrained(models.build_model(model.config), start, str(tmp_path / "base"))
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(whole / "final_adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(np.array(x), dtype=torch.long)).logits.numpy()
    ours = np.asarray(models.build_model(adapted_cfg).apply({"params": rebuilt}, x))
    assert np.abs(ours - theirs).max() < 1e-4
    # The stage checkpoints hold the adapters and their optimizer state, not the base weights.
    ckpt_dir = whole / "checkpoints" / "grpo"
    assert sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file()) < 0.5 * sum(
        x.nbytes for x in jax.tree.leaves(merged)
    )
