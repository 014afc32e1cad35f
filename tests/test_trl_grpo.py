"""jaxvlm.bench.trl_grpo: the jaxvlm config -> GRPOConfig mapping (and its refusals), the prompt order TRL is given,
the reward wrappers, the schedule and optimizer equivalences, and (with trl installed) the loss of both
implementations on one shared batch and one TRL training step on a tiny random Llama."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from jaxvlm import configuration, rewards
from jaxvlm.bench import trl_grpo
from jaxvlm.configuration import ConfigError, base_config, gym_source, stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ("word_arithmetic",)
DIGITS_REWARD = "test_trl_grpo_digits"


def grpo_config(model_path: str = "", **stage_overrides):
    """A one-stage grpo config on the gym's word problems (text only); `model_path` "" = the tiny preset."""
    c = base_config()
    c.model.update(preset="" if model_path else "tiny", path=model_path)
    c.mesh.shape = (1, 1, 1)
    c.stage_order = ("grpo",)
    overrides = dict(
        steps=2,
        data=dict(
            sources=[gym_source("train", 64, tasks=TASK)],
            batch_size=2,
            prompt_style="plain",
            max_prompt_length=256,
        ),
        rewards=[{"name": "accuracy", "kwargs": {"extract": "raw"}}],
        optimizer=dict(learning_rate=1e-3, weight_decay=0.0, warmup_steps=0, schedule="cosine", final_lr_ratio=0.0),
        loss=dict(beta=0.04, kl_estimator="k3", eps_low=0.2, eps_high=0.2, aggregation="grpo"),
        sampling=dict(num_generations=4, max_new_tokens=8, temperature=1.0),
    )
    for key, value in stage_overrides.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    c.stages.grpo = stage("grpo", **overrides)
    c.eval.update(sources=[gym_source("validation", 8, tasks=TASK)], num_examples=4, batch_size=4)
    c.eval.sampling.max_new_tokens = 8
    return c


# ----------------------------------------------------------------------------------------------------------
# The mapping (no torch, no trl)
# ----------------------------------------------------------------------------------------------------------


def test_mapping_of_configs_grpo_tiny():
    """configs/grpo.py:tiny, key by key."""
    cfg = trl_grpo.load_config(os.path.join(REPO, "configs", "grpo.py") + ":tiny")
    got = trl_grpo.grpo_config_from_jaxvlm(cfg)
    # 2 prompts x G 4 = 8 rows, 1 mini-batch x 2 micro-batches; 4 steps x 1 update; cosine to 0, lr 1e-3
    assert got == dict(
        num_generations=4,
        max_completion_length=48,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        generation_batch_size=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        shuffle_dataset=False,
        num_iterations=1,
        epsilon=0.2,
        epsilon_high=0.2,
        delta=None,
        importance_sampling_level="token",
        beta=0.04,
        use_bias_correction_kl=False,
        loss_type="grpo",
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        scale_rewards="group",
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=[1.0, 1.0],
        mask_truncated_completions=False,
        top_entropy_quantile=1.0,
        entropy_coef=0.0,
        disable_dropout=True,
        optim="adamw_torch",
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        lr_scheduler_kwargs={},
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # remat "auto" on the tiny preset: none
    )


def test_mapping_of_configs_smollm2_math():
    """configs/smollm2_math.py:grpo (the comparison this module was written for): its sizes and TRL-like settings."""
    cfg = trl_grpo.load_config(os.path.join(REPO, "configs", "smollm2_math.py") + ":grpo")
    cfg.model.update(path="checkpoint", remat="none")  # resolved, never read (remat given: no config.json needed)
    got = trl_grpo.grpo_config_from_jaxvlm(cfg)
    expected = dict(
        num_generations=4,
        generation_batch_size=16,  # 4 prompts x G 4
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        max_steps=12,  # configs/smollm2_math.py STEPS
        beta=0.04,
        loss_type="grpo",
        scale_rewards="group",
        reward_weights=[1.0, 1.0],
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        bf16=False,
        gradient_checkpointing=False,
    )
    assert {k: got[k] for k in expected} == expected
    assert got["max_completion_length"] == cfg.stages.grpo.sampling.max_new_tokens


def test_mapping_of_every_other_setting():
    """Non-default values of every mapped key land where they should."""
    cfg = grpo_config(
        steps=3,
        data=dict(batch_size=4),
        rewards=["format_answer_tag:0.5", {"name": "accuracy", "weight": 2.0, "kwargs": {"extract": "raw"}}],
        optimizer=dict(
            learning_rate=3e-4,
            schedule="cosine",
            final_lr_ratio=0.1,
            warmup_steps=2,
            weight_decay=0.01,
            b1=0.8,
            b2=0.95,
            eps=1e-6,
            max_grad_norm=None,
        ),
        loss=dict(
            beta=0.0,
            kl_estimator="k1",  # no KL term: the estimator is never used, so it is not refused
            eps_low=0.1,
            eps_high=0.28,
            delta=1.5,
            importance="sequence",
            aggregation="dapo",
            advantage_scale="batch",
            num_iterations=2,
        ),
        sampling=dict(num_generations=2, max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05),
        batch=dict(mini_batches=2, micro_batches=2),
    )
    cfg.model.update(dtype="bfloat16", param_dtype="float32", remat="full")
    got = trl_grpo.grpo_config_from_jaxvlm(cfg)
    expected = dict(
        num_generations=2,
        max_completion_length=16,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        generation_batch_size=8,  # 4 prompts x G 2
        per_device_train_batch_size=2,  # 8 rows / (K 2 x M 2)
        gradient_accumulation_steps=2,  # M
        max_steps=12,  # 3 steps x K 2 x mu 2
        num_iterations=2,
        epsilon=0.1,
        epsilon_high=0.28,
        delta=1.5,
        importance_sampling_level="sequence",
        beta=0.0,
        loss_type="dapo",
        scale_rewards="batch",
        reward_weights=[0.5, 2.0],
        learning_rate=3e-4,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=2,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        weight_decay=0.01,
        max_grad_norm=0.0,  # None: no clipping (HF clips only for max_grad_norm > 0)
        bf16=True,
        fp16=False,
        gradient_checkpointing=True,
    )
    assert {k: got[k] for k in expected} == expected
    for aggregation in ("grpo", "bnpo", "dr_grpo"):
        cfg.stages.grpo.loss.aggregation = aggregation
        assert trl_grpo.grpo_config_from_jaxvlm(cfg)["loss_type"] == aggregation
    cfg.stages.grpo.loss.advantage_scale = "none"
    cfg.stages.grpo.optimizer.update(schedule="constant", warmup_steps=0)
    got = trl_grpo.grpo_config_from_jaxvlm(cfg)
    assert (got["scale_rewards"], got["lr_scheduler_type"]) == ("none", "constant")
    cfg.stages.grpo.optimizer.warmup_steps = 3
    assert trl_grpo.grpo_config_from_jaxvlm(cfg)["lr_scheduler_type"] == "constant_with_warmup"


def test_mapping_of_cispo_and_sapo():
    """TRL 1.16 ties loss_type "cispo" to dapo's normalisation and "sapo" to grpo's: those two map (the CISPO cap is
    TRL's epsilon_high), any other aggregation is refused (test_refuses_what_trl_cannot_express)."""
    cfg = grpo_config(loss=dict(surrogate="cispo", cispo_eps_max=4.0, aggregation="dapo", importance="sequence"))
    got = trl_grpo.grpo_config_from_jaxvlm(cfg)
    assert (got["loss_type"], got["epsilon_high"], got["importance_sampling_level"]) == ("cispo", 4.0, "sequence")
    loss = dict(surrogate="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, aggregation="grpo")
    got = trl_grpo.grpo_config_from_jaxvlm(grpo_config(loss=loss))
    assert (got["loss_type"], got["sapo_temperature_pos"], got["sapo_temperature_neg"]) == ("sapo", 0.5, 2.0)
    got = trl_grpo.grpo_config_from_jaxvlm(grpo_config())  # clip: TRL's own SAPO defaults, its epsilon_high
    assert (got["loss_type"], got["sapo_temperature_pos"], got["sapo_temperature_neg"]) == ("grpo", 1.0, 1.05)
    assert got["epsilon_high"] == 0.2


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: setattr(c.stages.grpo.loss, "kl_estimator", "k2"), "config.stages.grpo.loss.kl_estimator"),
        (lambda c: setattr(c.stages.grpo.sampling, "temperature", 0.0), "config.stages.grpo.sampling.temperature"),
        (lambda c: setattr(c.stages.grpo.optimizer, "frozen", ("embed",)), "config.stages.grpo.optimizer.frozen"),
        (
            lambda c: c.stages.grpo.optimizer.update(weight_decay=0.1, no_decay=("bias$",)),
            "config.stages.grpo.optimizer.no_decay",
        ),
        (lambda c: c.model.update(dtype="bfloat16", param_dtype="bfloat16"), "config.model.dtype"),
        (lambda c: setattr(c.model.lora, "rank", 8), "config.model.lora.rank"),
        (lambda c: setattr(c.stages.grpo.optimizer, "warmup_steps", 2), "config.stages.grpo.optimizer.warmup_steps"),
        (lambda c: setattr(c.stages.grpo, "mode", "dyme"), "config.stage_order"),
        (lambda c: c.stages.grpo.loss.update(surrogate="cispo"), "config.stages.grpo.loss.aggregation"),
        (
            lambda c: c.stages.grpo.loss.update(surrogate="sapo", aggregation="dapo"),
            "config.stages.grpo.loss.aggregation",
        ),
        (
            lambda c: c.stages.grpo.loss.update(old_logp="recompute", sampler_correction="token_truncate"),
            "config.stages.grpo.loss.sampler_correction",
        ),
        (
            lambda c: c.stages.grpo.dynamic_sampling.update(enabled=True),
            "config.stages.grpo.dynamic_sampling.enabled",
        ),
    ],
    ids=[
        "kl_k2",
        "greedy",
        "frozen",
        "no_decay",
        "bf16_params",
        "lora",
        "warmup_past_end",
        "dyme",
        "cispo_grpo",
        "sapo_dapo",
        "sampler_correction",
        "dynamic_sampling",
    ],
)
def test_refuses_what_trl_cannot_express(change, key):
    cfg = grpo_config()
    if key.endswith("stage_order"):  # a dyme stage has its own keys: rebuild it
        cfg.stages.grpo = stage("dyme", **{k: cfg.stages.grpo[k] for k in ("steps", "data", "rewards", "sampling")})
    else:
        change(cfg)
    with pytest.raises(ConfigError) as error:
        trl_grpo.grpo_config_from_jaxvlm(cfg)
    assert str(error.value).startswith(key + ":")


def test_refuses_two_training_stages():
    cfg = grpo_config()
    cfg.stages.sft = stage("sft", steps=1, data=dict(sources=[gym_source("train", 8, tasks=TASK)], batch_size=2))
    cfg.stage_order = ("sft", "grpo")
    with pytest.raises(ConfigError, match=r"^config\.stage_order: .*exactly one stage of mode 'grpo'"):
        trl_grpo.grpo_config_from_jaxvlm(cfg)


def test_schedules_match_optax():
    """The mapped HF scheduler gives the learning rate jaxvlm's optax schedule gives, update by update."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    from jaxvlm import train_steps

    for optimizer in (
        dict(schedule="cosine", final_lr_ratio=0.0, warmup_steps=0),
        dict(schedule="cosine", final_lr_ratio=0.1, warmup_steps=3),
        dict(schedule="constant", warmup_steps=4),
        dict(schedule="constant", warmup_steps=0),
    ):
        cfg = grpo_config(steps=10, optimizer=dict(learning_rate=2e-3, **optimizer))
        mapped = trl_grpo.grpo_config_from_jaxvlm(cfg)
        _, _, plan = trl_grpo.resolved_stage(cfg)
        schedule = train_steps.learning_rate_schedule(plan.optimizer)
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=mapped["learning_rate"])
        hf = get_scheduler(
            mapped["lr_scheduler_type"],
            opt,
            num_warmup_steps=mapped["warmup_steps"],
            num_training_steps=mapped["max_steps"],
            scheduler_specific_kwargs=mapped["lr_scheduler_kwargs"],
        )
        expected = np.asarray(schedule(np.arange(mapped["max_steps"])))
        got = []
        for _ in range(mapped["max_steps"]):
            got.append(hf.get_last_lr()[0])
            opt.step()
            hf.step()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12, err_msg=str(optimizer))


def test_adamw_matches_optax():
    """torch.optim.AdamW with the mapped betas / eps / weight decay, after HF-style clipping, is jaxvlm's optimizer
    (optax clip_by_global_norm + adamw, decay on every parameter but biases and norm scales)."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from jaxvlm import train_steps

    cfg = grpo_config(
        steps=4,
        optimizer=dict(
            learning_rate=1e-2, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6, max_grad_norm=0.5, schedule="constant"
        ),
    )
    mapped = trl_grpo.grpo_config_from_jaxvlm(cfg)
    _, _, plan = trl_grpo.resolved_stage(cfg)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    opt = train_steps.make_optimizer(plan.optimizer, params)
    state, jax_params = opt.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(
        [
            {"params": [torch_params["w"]], "weight_decay": mapped["weight_decay"]},
            {"params": [torch_params["bias"]], "weight_decay": 0.0},
        ],
        lr=mapped["learning_rate"],
        betas=(mapped["adam_beta1"], mapped["adam_beta2"]),
        eps=mapped["adam_epsilon"],
    )
    for g in grads:
        updates, state = opt.update({k: jnp.asarray(v) for k, v in g.items()}, state, jax_params)
        jax_params = {k: jax_params[k] + updates[k] for k in params}
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), mapped["max_grad_norm"])
        torch_opt.step()
    for k in params:
        np.testing.assert_allclose(np.asarray(jax_params[k]), torch_params[k].detach().numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Prompts and rewards
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    """A small Qwen-style tokenizer trained on the gym's texts (its chat template handles string content)."""
    from jaxvlm.tokenizer import build_tokenizer, builtin_corpus

    return build_tokenizer(builtin_corpus(num_examples=200), tmp_path_factory.mktemp("tok"), vocab_size=512)


def text_model_config(tokenizer):
    """A text-only (Qwen2) model config with the tokenizer's ids: what a text checkpoint's config.json gives."""
    import dataclasses

    from jaxvlm.models import config as model_config_lib

    cfg = model_config_lib.preset("tiny")
    text = dataclasses.replace(
        cfg.text, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=512
    )
    return cfg.replace(model_type="qwen2", vision=None, text=text)


def test_prompt_plan_is_the_pipelines_order(text_tokenizer):
    """The plan is what jaxvlm's trainer reads: its StagePlan's data section through `sources.input_pipeline`, batch
    by batch, in order (so a different seed reorders it); each row's ids are the chat-rendered user text."""
    from jaxvlm.data import sources

    model_config = text_model_config(text_tokenizer)
    cfg = grpo_config(steps=3)
    plan = trl_grpo.prompt_plan(cfg, text_tokenizer, model_config)
    _, stage, stage_plan = trl_grpo.resolved_stage(cfg)
    iterator = iter(sources.input_pipeline(stage_plan.data(), text_tokenizer, None, model_config))
    for step in range(3):
        batch = next(iterator)
        assert [row["id"] for row in plan[step]] == [ex["id"] for ex in batch["examples"]]
        ids, mask = batch["prompts"]["input_ids"], batch["prompts"]["attention_mask"]
        assert [row["prompt_ids"] for row in plan[step]] == [ids[i][mask[i] == 1].tolist() for i in range(2)]
    assert len(plan) == 3 and all(len(rows) == 2 for rows in plan)
    row = plan[0][0]
    assert row["text"] == row["example"]["question"]  # prompt style "plain"
    rendered = text_tokenizer.apply_chat_template(
        trl_grpo.trl_messages(row["text"]), tokenize=False, add_generation_prompt=True
    )
    assert text_tokenizer.decode(row["prompt_ids"]) == rendered
    trl_grpo.check_prompt_tokens(plan, text_tokenizer)  # TRL's tokenization call gives the same ids
    cfg.seed = 1
    reordered = trl_grpo.prompt_plan(cfg, text_tokenizer, model_config)
    assert [r["id"] for r in reordered[0]] != [r["id"] for r in plan[0]]
    wrong = [[dict(plan[0][0], prompt_ids=plan[0][0]["prompt_ids"][1:])]]
    with pytest.raises(ValueError, match="TRL's chat-template tokens differ"):
        trl_grpo.check_prompt_tokens(wrong, text_tokenizer)


def test_same_prompts_check():
    plan = [[{"id": "a"}, {"id": "b"}], [{"id": "c"}, {"id": "d"}]]
    log = trl_grpo.IdLog()
    log.ids = ["a", "a", "b", "b", "c", "c", "d", "d"]  # G = 2
    trl_grpo.check_same_prompts(plan, log.steps(4, 2), "side")
    log.ids = ["a", "a", "b", "b", "d", "d", "c", "c"]
    with pytest.raises(ValueError, match=r"side step 2: scored prompts \['d', 'c'\]"):
        trl_grpo.check_same_prompts(plan, log.steps(4, 2), "side")


def test_reward_wrappers_give_jaxvlms_rewards(text_tokenizer):
    """TRL's reward functions return what `rewards.compute_rewards` gives on the same completions, decoded from
    TRL's completion ids as jaxvlm decodes its own (the EOS dropped), and record the examples scored."""
    examples = [
        {"id": "e0", "question": "q", "answer": "8", "answer_type": "number"},
        {"id": "e1", "question": "q", "answer": "3", "answer_type": "number"},
    ]
    specs = rewards.parse_reward_specs(
        ["format_answer_tag:0.5", {"name": "accuracy", "kwargs": {"extract": "tags"}}, "accuracy"]
    )
    texts = ["<answer>8</answer>", "<answer> 3 </answer>", "the answer is 8", "<answer>7</answer> more"]
    rows = [0, 1, 0, 1]
    eos = text_tokenizer.eos_token_id
    completion_ids = [text_tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
    log = trl_grpo.IdLog()
    funcs = trl_grpo.trl_reward_funcs(specs, examples, text_tokenizer, log)
    assert [f.__name__ for f in funcs] == ["format_answer_tag", "accuracy_0", "accuracy_1"]
    got = np.array(
        [
            f(
                prompts=[[{"role": "user", "content": "q"}]] * 4,
                completions=None,
                completion_ids=completion_ids,
                jaxvlm_row=rows,
                trainer_state=None,
            )
            for f in funcs
        ]
    ).T
    expected = rewards.compute_rewards(specs, texts, [examples[r] for r in rows]).per_reward
    np.testing.assert_array_equal(got, expected)
    assert expected[:, 1].tolist() == [1.0, 1.0, 0.0, 0.0]  # not a test of nothing
    assert log.ids == ["e0", "e1", "e0", "e1"]
    # without a tokenizer: TRL's own decoded completion (conversational) is scored
    plain = trl_grpo.trl_reward_funcs(specs, examples)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    assert plain[1](prompts=None, completions=completions, jaxvlm_row=rows) == expected[:, 1].tolist()


def test_recorder_reward_changes_no_total():
    with trl_grpo.recording_prompts() as log:
        cfg = trl_grpo.with_recorder(grpo_config(), "grpo")
        specs = configuration.resolve(cfg).stage("grpo").rewards
        result = rewards.compute_rewards(specs, ["8", "9"], [{"id": "x", "answer": "8", "answer_type": "number"}] * 2)
        assert log.ids == ["x", "x"]
        assert result.total.tolist() == result.per_reward[:, 0].tolist() == [1.0, 0.0]
    assert trl_grpo.RECORDER_REWARD not in rewards.REWARDS


# ----------------------------------------------------------------------------------------------------------
# With trl: both implementations on one batch, and a TRL step, on a tiny random Llama
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def digits_reward():
    """A reward that varies within a group of random-model completions (accuracy would be 0 everywhere)."""

    def digits(completion, example):
        del example
        return sum(ch.isdigit() for ch in completion) / max(len(completion), 1) + 0.01 * len(completion)

    rewards.register(DIGITS_REWARD)(digits)
    yield DIGITS_REWARD
    rewards.REWARDS.pop(DIGITS_REWARD, None)


def tiny_llama(path: str, tokenizer, seed: int = 0, noise: float = 0.0, base: str | None = None):
    """A random tiny LlamaForCausalLM (tied embeddings) with `tokenizer` saved next to it; with `base`, that
    checkpoint's weights plus Gaussian noise of std `noise`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    else:
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters=dict(rope_type="default", rope_theta=1e4),
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # larger weights than the default init: peaked, varied distributions
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_loss_parity_and_a_trl_step(tmp_path, text_tokenizer, digits_reward):
    """On jaxvlm's step-0 rollouts, scored by a policy that is not the reference (so the ratio, the clip and the KL
    term all act), TRL's `_compute_loss` and jaxvlm's `grpo_loss_fn` agree: loss, KL, clip fraction, gradient
    norm, per-token log-probs. Then TRL trains one step on the planned prompts, in order, with jaxvlm's reward."""
    pytest.importorskip("trl")
    base = tiny_llama(str(tmp_path / "base"), text_tokenizer)
    policy = tiny_llama(str(tmp_path / "policy"), text_tokenizer, seed=1, noise=0.02, base=base)
    cfg = grpo_config(
        base,
        steps=1,
        rewards=[DIGITS_REWARD],
        accuracy_reward="",
        sampling=dict(num_generations=4, max_new_tokens=12, temperature=1.0),
        loss=dict(beta=0.1, eps_low=0.05, eps_high=0.05),
    )
    parity = trl_grpo.loss_parity(cfg, str(tmp_path / "parity"), policy_dir=policy)
    assert parity["rows"] == 8 and parity["tokens"] > 8
    assert parity["jaxvlm_kl"] > 1e-4 and parity["jaxvlm_clip_fraction"] > 0  # the terms are at work
    assert parity["loss_abs_diff"] < 1e-5, parity
    assert parity["jaxvlm_kl"] == pytest.approx(parity["trl_kl"], rel=1e-4, abs=1e-7)
    assert parity["jaxvlm_clip_fraction"] == pytest.approx(parity["trl_clip_fraction"], abs=1e-6)
    assert parity["grad_norm_rel_diff"] < 1e-4, parity
    assert parity["logp_max_abs_diff"] < 1e-4 and parity["ref_logp_max_abs_diff"] < 1e-4, parity

    from jaxvlm import runtime

    spec = configuration.resolve(cfg)
    plan = trl_grpo.prompt_plan(cfg, text_tokenizer, runtime.model_config(spec.model))
    trl_side = trl_grpo.run_trl(cfg, plan, str(tmp_path / "trl"))
    trl_grpo.check_same_prompts(plan, trl_side["scored_ids"], "TRL")
    (step,) = trl_side["steps"]
    assert step["reward"] > 0 and math.isfinite(step["loss"]) and step["wall_s"] > step["rollout_s"] > 0
    assert step["rewards"][DIGITS_REWARD] == pytest.approx(step["reward"])
    assert step["learning_rate"] == pytest.approx(1e-3)
    assert os.path.isfile(os.path.join(trl_side["model_dir"], "config.json"))


@pytest.mark.slow
def test_jaxvlm_run_and_trl_replay(tmp_path, text_tokenizer, digits_reward):
    """jaxvlm's trainer scores the planned prompts in order (the recorder), and TRL trained on its recorded rollouts
    follows it step by step: loss, KL and gradient norm at every step, and the final weights."""
    pytest.importorskip("trl")
    from jaxvlm import runtime

    base = tiny_llama(str(tmp_path / "base"), text_tokenizer)
    cfg = trl_grpo.bench_config(
        grpo_config(
            base,
            steps=3,
            rewards=[DIGITS_REWARD],
            accuracy_reward="",
            sampling=dict(num_generations=4, max_new_tokens=12, temperature=1.0),
            loss=dict(beta=0.1),
        ),
        base,
        seed=0,
    )
    spec = configuration.resolve(cfg)
    plan = trl_grpo.prompt_plan(cfg, text_tokenizer, runtime.model_config(spec.model))
    side = trl_grpo.run_jaxvlm(cfg, str(tmp_path / "jax"))
    trl_grpo.check_same_prompts(plan, side["scored_ids"], "jaxvlm")
    assert [s["step"] for s in side["steps"]] == [1, 2, 3] and side["eval_after"]["examples"] == 4
    assert side["steps"][2]["kl"] > 0
    replay = trl_grpo.replay_in_trl(cfg, plan, side, str(tmp_path / "replay"))
    assert len(replay["steps"]) == 3
    assert replay["loss_max_abs_diff"] < 1e-5 and replay["kl_max_abs_diff"] < 1e-5, replay
    assert replay["grad_norm_max_rel_diff"] < 1e-3, replay
    assert replay["final_weights_rel_diff"] < 1e-2, replay
