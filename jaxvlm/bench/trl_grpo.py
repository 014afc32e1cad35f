"""The same GRPO run in TRL and in jaxvlm: same checkpoint, prompts in the same order, rewards and hyperparameters.

    python -m jaxvlm.bench.trl_grpo --model-path DIR --config configs/smollm2_math.py:grpo --seeds 0,1,2 --out OUT \\
        [--steps N] [--replay]

For each seed, on the checkpoint DIR:
  (a) TRL's `GRPOTrainer` (torch, CPU, no vLLM), configured by `grpo_config_from_jaxvlm(config)`;
  (b) jaxvlm's trainer (`jaxvlm.trainer.run`) on the config itself (train.log_every 1, no intermediate evaluation or
      checkpoints: logging and bookkeeping only).
Both train on the prompts jaxvlm's input pipeline yields for the seed, in that order (`prompt_plan`): TRL gets them as
a dataset in that order with its shuffling off, and the run asserts it: the prompt token ids TRL's chat-template call
gives equal jaxvlm's, and the example ids both trainers actually scored, step by step, equal the plan (jaxvlm's are
recorded by a reward of weight 0, `recording_prompts`). The rewards are jaxvlm's registered functions on both sides
(`trl_reward_funcs` wraps them for TRL, decoding TRL's completion ids as jaxvlm decodes its own). Before the runs,
`loss_parity` scores jaxvlm's step-0 rollouts with both implementations (same old / reference log-probs) and records
the loss, KL, clip fraction, gradient norm and log-prob differences; after them, the same check with jaxvlm's trained
model as the policy (the ratio, the clip and the KL term are then all at work). With --replay, TRL's trainer is also
run on jaxvlm's own recorded rollouts, step by step (`replay_in_trl`): the same algorithm gives the same loss, KL and
gradient norm at every step and nearly the same final weights, so what differs between the two independent runs is
what they sampled.
Held-out accuracy before and after: jaxvlm's evaluator (`evaluation.evaluate` on `evaluation.task_for_stage`, greedy,
the config's `eval` section), for the base checkpoint, for TRL's model (`save_pretrained`, read back by jaxvlm) and,
from the jaxvlm trainer's own end-of-stage evaluation (the same function and task), for jaxvlm's model.
Writes OUT/results.json (per seed and side: per-step reward, per reward function, reward std, KL, completion length,
loss, grad norm, learning rate, wall time; held-out accuracy before / after; the resolved hyperparameters of both
sides; the prompt check; the parity checks) and OUT/results.png (reward curves, mean over seeds and each seed thin;
per-step wall time). A seed whose sides are in results.json is not run again.

How the jaxvlm config maps onto GRPOConfig (`grpo_config_from_jaxvlm`; anything TRL cannot express is a ConfigError
naming the key):
  sampling.num_generations / max_new_tokens      num_generations / max_completion_length
  sampling.temperature / top_p / top_k / min_p   temperature / top_p / top_k / min_p (0 -> None); temperature 0 refused
  data.batch_size P, batch.mini_batches K,       generation_batch_size P*G, per_device_train_batch_size P*G/(K*M),
    batch.micro_batches M                          gradient_accumulation_steps M, steps_per_generation K*M
  loss.num_iterations / eps_low / eps_high       num_iterations / epsilon / epsilon_high
  loss.delta / importance                        delta / importance_sampling_level
  loss.surrogate "cispo" with aggregation dapo   loss_type "cispo", epsilon_high = loss.cispo_eps_max (TRL's cap)
  loss.surrogate "sapo" with aggregation grpo    loss_type "sapo", sapo_temperature_pos / _neg (TRL ties each to that
                                                   normalisation: another aggregation is refused)
  loss.beta, kl_estimator                        beta (k3 is TRL's only estimator: k1 / k2 with beta > 0 refused)
  loss.old_logp                                  either: TRL recomputes pi_old (teacher-forced) when it has one (mu > 1
                                                   or K > 1) and is on policy otherwise; jaxvlm's "sampler" differs
                                                   from that by the sampler / trainer mismatch (~1e-7 in float32)
  loss.sampler_correction                        refused unless "none" (TRL corrects only vLLM's log-probs)
  dynamic_sampling.enabled                       refused (TRL 1.16 has no dynamic sampling)
  loss.aggregation / advantage_scale             loss_type / scale_rewards
  rewards (weights)                              reward_funcs (jaxvlm's functions) / reward_weights
  optimizer.learning_rate, warmup_steps          learning_rate, warmup_steps
  optimizer.schedule, final_lr_ratio             lr_scheduler_type cosine | cosine_with_min_lr (min_lr_rate) |
                                                   constant | constant_with_warmup (the same curves: optax's
                                                   warmup_cosine_decay_schedule is HF's formula)
  optimizer.b1 / b2 / eps / weight_decay         adam_beta1 / adam_beta2 / adam_epsilon / weight_decay (adamw_torch)
                                                   (both exempt biases and norm weights from decay; another
                                                   optimizer.no_decay with weight decay is refused)
  optimizer.max_grad_norm                        max_grad_norm (None -> 0: no clipping); optimizer.frozen refused
  stage length (steps, or epochs)                max_steps = loop steps x K x num_iterations (TRL counts updates)
  model.dtype / param_dtype                      float32 / float32 -> fp32; bfloat16 / float32 -> bf16 autocast;
                                                   others refused
  model.remat                                    gradient_checkpointing (speed only; "auto" as jaxvlm resolves it)
  model.lora                                     refused (full weights on both sides; LoRA vs peft: jaxvlm.bench)
and pinned so a TRL default cannot drift in: use_bias_correction_kl False (TRL's default True multiplies the KL
term by the ratio, whose gradient adds KL x grad log-prob: not jaxvlm's loss), mask_truncated_completions False,
multi_objective_aggregation sum_then_normalize, top_entropy_quantile 1, entropy_coef 0, repetition_penalty 1,
shuffle_dataset False, disable_dropout True, use_vllm False.

Where the two cannot match exactly (closest choice taken):
  * Sampled tokens: different samplers and random streams, so the rollouts differ; the curves are compared over
    seeds, and the losses on one shared batch (`loss_parity`).
  * Old log-probs: jaxvlm's ratio uses the sampler's log-probs; TRL uses log pi.detach() when generation and updates
    line up (K = num_iterations = 1) and otherwise recomputes them with a forward pass before the first update. In
    value the ratio is 1 either way up to float noise; `loss_parity` gives TRL the sampler's log-probs.
  * K > 1 mini-batches: TRL shuffles the rollout rows before cutting them; jaxvlm keeps their order. With dapo, TRL
    divides each mini-batch by the batch's mean token count per mini-batch, jaxvlm by the mini-batch's own.
  * Positions: transformers scores left-padded rows at positions offset by the padding (RoPE is shift-invariant);
    jaxvlm counts from each row's first token. Log-probs agree to float noise (`loss_parity` reports it).
  * The log-ratio is clipped to +-20 before exp in jaxvlm, not in TRL (inert unless the policy runs away).
  * Prompts: both sides render jaxvlm's user text with the checkpoint's chat template (its system prompt included);
    the token ids are asserted equal. EOS: both stop at the model's EOS ids and keep the EOS in the loss mask;
    truncated completions stay in the loss on both sides.
  * Reward std: jaxvlm logs the population std; it is converted to TRL's Bessel-corrected std here.
  * Wall time: TRL's per optimizer step, from its step-end callbacks (generation, rewards, reference and policy
    passes, the update); jaxvlm's `time/step_s` (the same work; its first step includes XLA compilation). Of that,
    `rollout_s`: TRL's `_generate` (sampling, decoding), jaxvlm's `time/rollout_s` (the same plus the rewards).
    The sides run one after the other, each side's load average at its start and end is recorded (a shared
    machine's load slows the two unevenly).
  * Mesh and data-loader settings have no TRL counterpart (one CPU process); evaluation stages are ignored.

torch, transformers' models, trl and datasets are imported inside the TRL-side functions only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxvlm import configuration, rewards
from jaxvlm.configuration import config_error

RECORDER_REWARD = "trl_grpo_prompt_log"
DEFAULT_NO_DECAY = (r"bias$", r"scale$")
LOSS_TYPES = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo"}  # surrogate "clip"
# TRL's loss_type for the other surrogates, and the one normalisation TRL 1.16 gives each (jaxvlm's aggregation)
SURROGATE_LOSS_TYPES = {"cispo": ("cispo", "dapo"), "sapo": ("sapo", "grpo")}
ADVANTAGE_SCALES = {"group": "group", "batch": "batch", "none": "none"}


# ----------------------------------------------------------------------------------------------------------
# The config: its one GRPO stage, and the GRPOConfig it maps to (no torch, no trl)
# ----------------------------------------------------------------------------------------------------------


def load_config(path_and_arg: str):
    """A recipe config from "configs/x.py[:arg]" (its `get_config(arg)`)."""
    path, _, arg = path_and_arg.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path_and_arg}: {path} not found")
    spec = importlib.util.spec_from_file_location("_trl_grpo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def grpo_stage_name(cfg) -> str:
    """The name of the config's one training stage, which must be a grpo stage (eval stages are ignored)."""
    from jaxvlm import stages

    modes = {name: cfg.stages[name].mode for name in cfg.stage_order}
    training = [name for name, mode in modes.items() if mode in stages.MODES and stages.get(mode).trains]
    if len(training) != 1 or modes[training[0]] != "grpo":
        raise config_error(
            "stage_order",
            f"{tuple(cfg.stage_order)} has training stages {[(n, modes[n]) for n in training]}; the TRL comparison "
            "runs exactly one stage of mode 'grpo' (TRL's GRPOTrainer has no SFT-then-RL sequence and no DyME)",
        )
    return training[0]


def resolved_stage(cfg):
    """(RunSpec, the grpo StageSpec, its StagePlan): the config as jaxvlm's trainer resolves it."""
    from jaxvlm import stages

    spec = configuration.resolve(cfg)
    name = grpo_stage_name(cfg)
    stage = spec.stage(name)
    return spec, stage, stages.plan(stages.get(stage.mode), stage)


def _remat_is_on(cfg) -> bool:
    remat = cfg.model.remat
    if remat != "auto":
        return remat != "none"
    from jaxvlm import models
    from jaxvlm.models.config import default_remat

    model_config = models.load_hf_config(cfg.model.path) if cfg.model.path else models.preset(cfg.model.preset)
    return default_remat(model_config) != "none"


def grpo_config_from_jaxvlm(cfg) -> dict[str, Any]:
    """The GRPOConfig keyword arguments that make TRL's GRPOTrainer run the config's grpo stage (module docstring:
    the mapping). A setting TRL cannot express is a ConfigError naming its key. Run-time arguments (output_dir,
    seed, logging, use_cpu) are the caller's."""
    spec, stage, plan = resolved_stage(cfg)
    key = stage.key
    loss, opt, sp = stage.loss, plan.optimizer, stage.sampling
    if sp.temperature == 0:
        raise config_error(
            f"{key}.sampling.temperature",
            "0 (greedy rollouts): TRL's GRPOTrainer always samples (do_sample=True); give a temperature > 0",
        )
    if loss.beta > 0 and loss.kl_estimator != "k3":
        raise config_error(
            f"{key}.loss.kl_estimator",
            f"{loss.kl_estimator!r} with beta={loss.beta}: TRL's KL term is the k3 estimator only",
        )
    if loss.surrogate == "clip":
        loss_type, epsilon_high = LOSS_TYPES[loss.aggregation], loss.eps_high
    else:
        loss_type, aggregation = SURROGATE_LOSS_TYPES[loss.surrogate]
        if loss.aggregation != aggregation:
            raise config_error(
                f"{key}.loss.aggregation",
                f"{loss.aggregation!r} with surrogate={loss.surrogate!r}: TRL's loss_type={loss_type!r} normalises "
                f"as aggregation={aggregation!r} only",
            )
        epsilon_high = loss.cispo_eps_max if loss.surrogate == "cispo" else loss.eps_high
    if stage.dynamic_sampling.enabled:
        raise config_error(
            f"{key}.dynamic_sampling.enabled",
            "True: TRL's GRPOTrainer has no dynamic sampling (its docs say so); the two runs would differ",
        )
    if loss.sampler_correction != "none":
        raise config_error(
            f"{key}.loss.sampler_correction",
            f"{loss.sampler_correction!r}: TRL applies its importance-sampling correction to vLLM's log-probs only "
            "(use_vllm=True), which this comparison does not run",
        )
    if opt.frozen:
        raise config_error(f"{key}.optimizer.frozen", f"{opt.frozen}: TRL's GRPOTrainer trains every parameter")
    if opt.weight_decay > 0 and tuple(opt.no_decay) != DEFAULT_NO_DECAY:
        raise config_error(
            f"{key}.optimizer.no_decay",
            f"{opt.no_decay} with weight_decay={opt.weight_decay}: the HF Trainer exempts exactly the biases and norm "
            f"weights from decay (jaxvlm's default {DEFAULT_NO_DECAY})",
        )
    updates_per_step = stage.mini_batches * loss.num_iterations
    max_steps = plan.steps * updates_per_step
    if opt.warmup_steps >= max_steps and opt.warmup_steps > 0:
        raise config_error(
            f"{key}.optimizer.warmup_steps",
            f"{opt.warmup_steps} >= the stage's {max_steps} updates: the HF schedules and optax's differ there",
        )
    if "lora" in spec.model.overrides:
        raise config_error(
            "model.lora.rank",
            "this comparison trains every weight on both sides (TRL without a peft_config); LoRA runs are compared "
            "with transformers + peft by python -m jaxvlm.bench (its sft and grpo sections)",
        )
    dtypes = (spec.model.overrides["dtype"], spec.model.overrides["param_dtype"])
    precision = {("float32", "float32"): (False, False), ("bfloat16", "float32"): (True, False)}
    if dtypes not in precision:
        raise config_error(
            "model.dtype",
            f"dtype={dtypes[0]}, param_dtype={dtypes[1]}: the TRL side runs float32 weights in float32 or under "
            "bfloat16 autocast only",
        )
    bf16, fp16 = precision[dtypes]
    if opt.schedule == "cosine":
        scheduler = "cosine_with_min_lr" if opt.final_lr_ratio > 0 else "cosine"
        scheduler_kwargs = {"min_lr_rate": float(opt.final_lr_ratio)} if opt.final_lr_ratio > 0 else {}
    else:
        scheduler = "constant_with_warmup" if opt.warmup_steps > 0 else "constant"
        scheduler_kwargs = {}
    rows = stage.data.batch_size * sp.num_generations
    micro_rows = rows // (stage.mini_batches * stage.micro_batches)
    return dict(
        # sampling
        num_generations=sp.num_generations,
        max_completion_length=sp.max_new_tokens,
        temperature=float(sp.temperature),
        top_p=float(sp.top_p),
        top_k=int(sp.top_k),
        min_p=float(sp.min_p) if sp.min_p > 0 else None,
        repetition_penalty=1.0,
        use_vllm=False,
        # batches
        generation_batch_size=rows,
        per_device_train_batch_size=micro_rows,
        gradient_accumulation_steps=stage.micro_batches,
        max_steps=max_steps,
        shuffle_dataset=False,
        # loss
        num_iterations=loss.num_iterations,
        epsilon=float(loss.eps_low),
        epsilon_high=float(epsilon_high),
        delta=None if loss.delta is None else float(loss.delta),
        importance_sampling_level=loss.importance,
        beta=float(loss.beta),
        use_bias_correction_kl=False,
        loss_type=loss_type,
        sapo_temperature_pos=float(loss.sapo_temperature_pos),
        sapo_temperature_neg=float(loss.sapo_temperature_neg),
        scale_rewards=ADVANTAGE_SCALES[loss.advantage_scale],
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=[float(r.weight) for r in stage.rewards],
        mask_truncated_completions=False,
        top_entropy_quantile=1.0,
        entropy_coef=0.0,
        disable_dropout=True,
        # optimizer
        optim="adamw_torch",
        learning_rate=float(opt.learning_rate),
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=int(opt.warmup_steps),
        adam_beta1=float(opt.b1),
        adam_beta2=float(opt.b2),
        adam_epsilon=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        max_grad_norm=0.0 if opt.max_grad_norm is None else float(opt.max_grad_norm),
        # precision and memory
        bf16=bf16,
        fp16=fp16,
        gradient_checkpointing=_remat_is_on(cfg),
    )


def jaxvlm_hyperparameters(cfg) -> dict[str, Any]:
    """The grpo stage as jaxvlm's trainer runs it (resolved: derived values filled in)."""
    spec, stage, plan = resolved_stage(cfg)
    return {
        "stage": stage.name,
        "steps": plan.steps,
        "updates_per_step": stage.mini_batches * stage.loss.num_iterations,
        "prompts_per_step": stage.data.batch_size,
        "micro_batches": stage.micro_batches,
        "mini_batches": stage.mini_batches,
        "loss": dataclasses.asdict(stage.loss),
        "optimizer": dataclasses.asdict(plan.optimizer),
        "sampling": dataclasses.asdict(stage.sampling),
        "rewards": [dataclasses.asdict(r) for r in stage.rewards],
        "data": {k: v for k, v in dataclasses.asdict(stage.data).items() if k not in ("num_threads", "prefetch")},
        "model": {"path": spec.model.path, **spec.model.overrides},
        "seed": spec.seed,
    }


# ----------------------------------------------------------------------------------------------------------
# Prompts: the order jaxvlm's pipeline yields, for TRL
# ----------------------------------------------------------------------------------------------------------


def prompt_plan(cfg, tokenizer, model_config) -> list[list[dict]]:
    """The prompts of each step of the config's grpo stage, in the order jaxvlm's trainer reads them: the same
    `sources.input_pipeline` call on the same PipelineConfig (seeded by config.seed). One list per step (as many as
    the stage runs, fewer if the data ends first) of {"id", "text" (the user turn jaxvlm renders), "prompt_ids"
    (jaxvlm's token ids, unpadded), "example" (the example's metadata: what the rewards score against)}."""
    from jaxvlm.data import sources

    _, stage, plan = resolved_stage(cfg)
    if model_config.vision is not None:
        raise config_error("model.path", "a vision-language model: the TRL comparison runs text-only models")
    iterator = iter(sources.input_pipeline(plan.data(), tokenizer, None, model_config))
    steps = []
    try:
        for _ in range(plan.steps):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            steps.append(plan_rows(batch, stage))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return steps


def plan_rows(batch: Mapping[str, Any], stage) -> list[dict]:
    """One pipeline batch as planned prompts (see `prompt_plan`)."""
    from jaxvlm.data import prompts

    ids, mask = batch["prompts"]["input_ids"], batch["prompts"]["attention_mask"]
    rows = []
    for i, example in enumerate(batch["examples"]):
        rows.append(
            {
                "id": str(example.get("id", "")),
                "text": prompts.user_text(example, stage.data.prompt_style, with_caption=stage.data.with_caption),
                "prompt_ids": [int(t) for t, m in zip(ids[i], mask[i]) if m],
                "example": dict(example),
            }
        )
    return rows


def trl_messages(text: str) -> list[dict]:
    """The conversational prompt TRL renders with the chat template: one user turn of jaxvlm's text."""
    return [{"role": "user", "content": text}]


def check_prompt_tokens(plan: Sequence[Sequence[dict]], tokenizer) -> None:
    """TRL's tokenization of every planned prompt (`apply_chat_template(..., add_generation_prompt=True,
    tokenize=True)`, as `GRPOTrainer._tokenize_prompts` calls it) equals jaxvlm's token ids; ValueError naming the
    first prompt that differs."""
    for step, rows in enumerate(plan):
        conversations = [trl_messages(row["text"]) for row in rows]
        tokenized = tokenizer.apply_chat_template(
            conversation=conversations, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        for row, ids in zip(rows, tokenized["input_ids"]):
            if list(ids) != row["prompt_ids"]:
                raise ValueError(
                    f"step {step}, example {row['id']}: TRL's chat-template tokens differ from jaxvlm's prompt "
                    f"({len(ids)} vs {len(row['prompt_ids'])} tokens): {tokenizer.decode(ids)!r} vs "
                    f"{tokenizer.decode(row['prompt_ids'])!r}"
                )


# ----------------------------------------------------------------------------------------------------------
# Rewards: jaxvlm's functions for TRL, and a recorder of what jaxvlm's trainer scored
# ----------------------------------------------------------------------------------------------------------


class IdLog:
    """Example ids in the order a trainer scored them (one entry per completion)."""

    def __init__(self):
        self.ids: list[str] = []

    def steps(self, rows_per_step: int, group_size: int) -> list[list[str]]:
        """The scored prompts per step: completions grouped by step, each prompt's G rows once."""
        out = []
        for start in range(0, len(self.ids) - rows_per_step + 1, rows_per_step):
            out.append(self.ids[start : start + rows_per_step : group_size])
        return out


def trl_reward_funcs(specs, examples: Sequence[Mapping], tokenizer=None, log: IdLog | None = None) -> list:
    """TRL reward functions, one per jaxvlm RewardSpec (named by its display name, so TRL logs
    `rewards/<name>/mean`), each scoring with jaxvlm's own `rewards.compute_rewards`. A completion is found by its
    dataset column `jaxvlm_row` (an index into `examples`); its text is `tokenizer.decode(completion_ids,
    skip_special_tokens=True)` as jaxvlm decodes its rollouts (without a tokenizer: TRL's decoded completion).
    `log` records the example ids the first function is asked to score."""
    specs = rewards.parse_reward_specs(specs)
    names = rewards.display_names(specs)

    def make(index: int, spec, name: str):
        def reward(prompts, completions, jaxvlm_row, completion_ids=None, **kwargs):
            del prompts, kwargs
            if tokenizer is not None and completion_ids is not None:
                texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in completion_ids]
            else:
                texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            rows = [examples[int(r)] for r in jaxvlm_row]
            if log is not None and index == 0:
                log.ids.extend(str(ex.get("id", "")) for ex in rows)
            return rewards.compute_rewards([spec], texts, rows).per_reward[:, 0].astype(float).tolist()

        reward.__name__ = name.replace("#", "_")
        return reward

    return [make(k, spec, name) for k, (spec, name) in enumerate(zip(specs, names))]


@contextlib.contextmanager
def recording_prompts():
    """Registers `RECORDER_REWARD`, a reward that scores 0 and records each scored example's id, for the duration;
    yields its IdLog. Added to a stage with weight 0 (`with_recorder`), it changes no total and no advantage."""
    log = IdLog()

    def record(completion: str, example: Mapping) -> float:
        del completion
        log.ids.append(str(example.get("id", "")))
        return 0.0

    rewards.register(RECORDER_REWARD)(record)
    try:
        yield log
    finally:
        rewards.REWARDS.pop(RECORDER_REWARD, None)


@contextlib.contextmanager
def recording_update_batches():
    """For the duration, every GRPO update batch jaxvlm's trainer assembles (`rollouts.grpo_update_batch`: the rollout
    rows [R, ...] with their advantages) is also kept, as host arrays, in the yielded list (one dict per step)."""
    from jaxvlm import rollouts

    batches: list[dict[str, np.ndarray]] = []
    assemble = rollouts.grpo_update_batch

    def recording(rows, *args, **kwargs):
        out = assemble(rows, *args, **kwargs)
        batches.append({k: np.array(v) for k, v in out[0].items() if k in REPLAY_FIELDS})
        return out

    rollouts.grpo_update_batch = recording
    try:
        yield batches
    finally:
        rollouts.grpo_update_batch = assemble


REPLAY_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_logp")


def save_batches(path: str, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    np.savez_compressed(path, **{f"{k}/{field}": v for k, b in enumerate(batches) for field, v in b.items()})


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        steps = sorted({int(key.split("/")[0]) for key in data.files})
        return [{field: data[f"{k}/{field}"] for field in REPLAY_FIELDS if f"{k}/{field}" in data.files} for k in steps]


def with_recorder(cfg, stage_name: str):
    """A copy of `cfg` whose stage also scores with the recorder, at weight 0."""
    cfg = copy.deepcopy(cfg)
    entries = list(cfg.stages[stage_name].rewards)
    cfg.stages[stage_name].rewards = [*entries, {"name": RECORDER_REWARD, "weight": 0.0}]
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The sides
# ----------------------------------------------------------------------------------------------------------


def bench_config(cfg, model_path: str, seed: int, steps: int = 0):
    """The config as both sides run it: the checkpoint, the seed, optionally another step budget; jaxvlm's trainer
    logs every step, evaluates at the stage's end only, writes its checkpoint at the end only."""
    cfg = copy.deepcopy(cfg)
    cfg.model.path, cfg.model.preset, cfg.seed = model_path, "", int(seed)
    name = grpo_stage_name(cfg)
    if steps:
        cfg.stages[name].steps = int(steps)
    cfg.train.update(log_every=1, eval_every=0, save_every=1_000_000, progress=False, tensorboard=False)
    return cfg


def _per_step(values: list[dict], updates: int) -> list[list[dict]]:
    return [values[i : i + updates] for i in range(0, len(values), updates)]


def _mean(entries: list[dict], key: str) -> float | None:
    present = [e[key] for e in entries if e.get(key) is not None]
    return float(np.mean(present)) if present else None


def run_jaxvlm(cfg, workdir: str) -> dict:
    """jaxvlm's trainer on `cfg` (see `bench_config`) in `workdir`: per-step metrics, the end-of-stage held-out
    evaluation, the example ids it scored per step, wall times. Its update batches are written to
    `workdir`/update_batches.npz (`replay_in_trl` trains TRL on them)."""
    from jaxvlm import trainer
    from jaxvlm.metrics import read_metrics

    name = grpo_stage_name(cfg)
    _, stage, plan = resolved_stage(cfg)
    g = stage.sampling.num_generations
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: a resumed one would score only the remaining steps
    with recording_prompts() as log, recording_update_batches() as batches:
        start = time.perf_counter()
        result = trainer.run(with_recorder(cfg, name), workdir)
        wall = time.perf_counter() - start
    if not result["finished"]:
        raise RuntimeError(f"{workdir}: the jaxvlm run stopped before its end")
    save_batches(os.path.join(workdir, "update_batches.npz"), batches)
    records = read_metrics(workdir)
    train = [r for r in records if "train/reward" in r and r.get("train/stage") == name]
    rows = stage.data.batch_size * g
    reward_names = rewards.display_names(stage.rewards)
    steps = []
    for r in train:
        std = r.get("train/rewards/total/std")
        steps.append(
            {
                "step": int(r["train/stage_step"]),
                "reward": r["train/reward"],
                "rewards": {n: r.get(f"train/rewards/{n}/mean") for n in reward_names},
                "reward_std": None if std is None else std * math.sqrt(rows / (rows - 1)),
                "kl": r.get("train/kl"),
                "completion_length": r.get("train/completion_length"),
                "entropy": r.get("train/entropy"),
                "clip_fraction": r.get("train/clip_region_fraction"),
                "frac_reward_zero_std": r.get("train/frac_reward_zero_std"),
                "loss": r.get("train/loss"),
                "grad_norm": r.get("train/grad_norm"),
                "learning_rate": r.get("train/learning_rate"),
                "wall_s": r.get("train/time/step_s"),
                "rollout_s": r.get("train/time/rollout_s"),
            }
        )
    evals = [r for r in records if "eval/accuracy" in r and r.get("eval/stage") == name]
    return {
        "steps": steps,
        "eval_after": {k[len("eval/") :]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None,
        "scored_ids": log.steps(rows, g),
        "train_wall_s": wall,
        "planned_steps": plan.steps,
        "final_model": os.path.join(workdir, "final_model"),
        "update_batches": os.path.join(workdir, "update_batches.npz"),
    }


def _torch_setup(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch


def _require_trl():
    """trl, or an ImportError saying how to install the bench extra."""
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError as error:
        raise ImportError(
            f"the TRL side needs {error.name}: pip install -c constraints.txt -e '.[bench]' (torch, trl, datasets)"
        ) from error
    return trl


def trl_arguments(cfg, output_dir: str, seed: int, **overrides):
    """trl.GRPOConfig of `grpo_config_from_jaxvlm(cfg)` plus the run-time arguments (CPU, log every update, no
    checkpoints, no reports)."""
    trl = _require_trl()
    values = grpo_config_from_jaxvlm(cfg)
    values.update(overrides)
    return trl.GRPOConfig(
        output_dir=output_dir,
        seed=int(seed),
        data_seed=int(seed),
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **values,
    )


def trl_trainer(cfg, plan: Sequence[Sequence[dict]], output_dir: str, log: IdLog | None = None, **overrides):
    """TRL's GRPOTrainer on the config's checkpoint over the planned prompts, in their order (a dataset with TRL's
    shuffling off; its tokenization of each prompt is checked against jaxvlm's first); (trainer, tokenizer).
    `overrides` replace GRPOConfig arguments (the parity check's one micro-batch)."""
    trl = _require_trl()
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch = _torch_setup(cfg.seed)
    _, stage, _ = resolved_stage(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path, padding_side="left")
    check_prompt_tokens(plan, tokenizer)
    rows = [row for step in plan for row in step]
    dataset = datasets.Dataset.from_list(
        [{"prompt": trl_messages(row["text"]), "jaxvlm_row": i} for i, row in enumerate(rows)]
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=trl_reward_funcs(stage.rewards, [row["example"] for row in rows], tokenizer, log),
        args=trl_arguments(cfg, output_dir, cfg.seed, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer, tokenizer


def run_trl(cfg, plan: Sequence[Sequence[dict]], output_dir: str) -> dict:
    """TRL's GRPOTrainer over the planned prompts: per-step metrics (log_history grouped by rollout step), wall
    time per step, the example ids it scored; the trained model saved with save_pretrained in output_dir/model."""
    from transformers import PrinterCallback, TrainerCallback

    _, stage, _ = resolved_stage(cfg)
    log = IdLog()
    trainer, tokenizer = trl_trainer(cfg, plan, output_dir, log)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    clock = StepClock()
    trainer.add_callback(clock)
    generate, generation_seconds = trainer._generate, []

    def timed_generate(prompts):  # sampling and decoding, as jaxvlm's time/rollout_s (which adds the rewards)
        start = time.perf_counter()
        try:
            return generate(prompts)
        finally:
            generation_seconds.append(time.perf_counter() - start)

    trainer._generate = timed_generate
    trainer.remove_callback(PrinterCallback)  # the per-step dicts are in results.json
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    model_dir = os.path.join(output_dir, "model")
    trainer.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    updates = stage.mini_batches * stage.loss.num_iterations
    entries = [e for e in trainer.state.log_history if "train_runtime" not in e and "step" in e]
    seconds = np.diff(clock.marks).tolist()
    for k, (entry, s) in enumerate(zip(entries, seconds)):
        entry["_wall_s"] = s
        if k % updates == 0 and k // updates < len(generation_seconds):
            entry["_rollout_s"] = generation_seconds[k // updates]
    reward_names = rewards.display_names(stage.rewards)
    steps = []
    for k, group in enumerate(_per_step(entries, updates)):
        steps.append(
            {
                "step": k + 1,
                "reward": _mean(group, "reward"),
                "rewards": {n: _mean(group, f"rewards/{n.replace('#', '_')}/mean") for n in reward_names},
                "reward_std": _mean(group, "reward_std"),
                "kl": _mean(group, "kl"),
                "completion_length": _mean(group, "completions/mean_length"),
                "entropy": _mean(group, "entropy"),
                "clip_fraction": _mean(group, "clip_ratio/region_mean"),
                "frac_reward_zero_std": _mean(group, "frac_reward_zero_std"),
                "loss": _mean(group, "loss"),
                "grad_norm": _mean(group, "grad_norm"),
                "learning_rate": group[0].get("learning_rate"),
                "wall_s": float(sum(e.get("_wall_s", 0.0) for e in group)),
                "rollout_s": group[0].get("_rollout_s"),
            }
        )
    rows = stage.data.batch_size * stage.sampling.num_generations
    return {
        "steps": steps,
        "scored_ids": log.steps(rows, stage.sampling.num_generations),
        "train_wall_s": wall,
        "model_dir": model_dir,
        "arguments": {k: _plain(v) for k, v in trainer.args.to_dict().items() if k in TRL_REPORTED},
    }


def _trl_inputs(trainer, rows: Mapping[str, np.ndarray], old_logp: bool):
    """GRPOTrainer's training inputs (what `_generate_and_score_completions` returns) for jaxvlm's rollout rows
    [R, ...]: the reference log-probs from TRL's own reference model; the old log-probs the sampler's (`old_logp`)
    or, as TRL does when generation and updates line up, none (log pi.detach())."""
    import torch

    def tensor(x, dtype):
        return torch.as_tensor(np.array(x)).to(dtype)

    inputs = {
        "prompt_ids": tensor(rows["prompt_ids"], torch.long),
        "prompt_mask": tensor(rows["prompt_mask"], torch.long),
        "completion_ids": tensor(rows["completion_ids"], torch.long),
        "completion_mask": tensor(rows["completion_mask"], torch.long),
        "advantages": tensor(rows["advantages"], torch.float32),
    }
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    if old_logp:
        inputs["old_per_token_logps"] = tensor(rows["old_logp"], torch.float32)
    if trainer.beta != 0.0:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, ids, mask, inputs["completion_ids"].shape[1]
            )
    return inputs


def replay_in_trl(cfg, plan: Sequence[Sequence[dict]], jaxvlm_side: Mapping[str, Any], output_dir: str) -> dict:
    """TRL's GRPOTrainer trained on jaxvlm's own rollouts, step by step (its generation replaced by jaxvlm's recorded
    update batches; everything else, reference forward, loss, clipping, AdamW, schedule, is TRL's loop), next to
    jaxvlm's logged loss, KL and gradient norm for the same steps; and how far TRL's final weights are from jaxvlm's,
    relative to jaxvlm's whole update. Same algorithm: the columns agree to float noise and the distance is small. A
    step whose sampled rollouts differ is then the only source of the two independent runs' differences."""
    from transformers import AutoModelForCausalLM, PrinterCallback

    batches = load_batches(jaxvlm_side["update_batches"])
    trainer, _ = trl_trainer(cfg, plan, output_dir, max_steps=len(batches) * _updates_per_step(cfg))
    trainer.remove_callback(PrinterCallback)
    queue = list(batches)
    trainer._generate_and_score_completions = lambda generation_batch: _trl_inputs(trainer, queue.pop(0), False)
    trainer.train()
    torch = _torch_setup(cfg.seed)
    updates = _updates_per_step(cfg)
    logged = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    steps = []
    for k, (group, ours) in enumerate(zip(_per_step(logged, updates), jaxvlm_side["steps"])):
        steps.append(
            {
                "step": k + 1,
                "jaxvlm_loss": ours["loss"],
                "trl_loss": _mean(group, "loss"),
                "jaxvlm_kl": ours["kl"],
                "trl_kl": _mean(group, "kl"),
                "jaxvlm_grad_norm": ours["grad_norm"],
                "trl_grad_norm": _mean(group, "grad_norm"),
            }
        )
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).state_dict()
    ours = AutoModelForCausalLM.from_pretrained(jaxvlm_side["final_model"], dtype=torch.float32).state_dict()
    theirs = trainer.model.state_dict()
    apart = sum(float(((ours[k] - theirs[k].detach()) ** 2).sum()) for k in base)
    moved = sum(float(((ours[k] - base[k]) ** 2).sum()) for k in base)
    return {
        "steps": steps,
        "loss_max_abs_diff": max(abs(s["jaxvlm_loss"] - s["trl_loss"]) for s in steps),
        "kl_max_abs_diff": max(abs(s["jaxvlm_kl"] - s["trl_kl"]) for s in steps)
        if steps[0]["trl_kl"] is not None
        else None,
        "grad_norm_max_rel_diff": max(
            abs(s["jaxvlm_grad_norm"] - s["trl_grad_norm"]) / s["jaxvlm_grad_norm"] for s in steps
        ),
        "final_weights_rel_diff": math.sqrt(apart / max(moved, 1e-30)),
    }


def _updates_per_step(cfg) -> int:
    _, stage, _ = resolved_stage(cfg)
    return stage.mini_batches * stage.loss.num_iterations


TRL_REPORTED = (
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_batch_size",
    "steps_per_generation",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "shuffle_dataset",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "beta",
    "use_bias_correction_kl",
    "loss_type",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "scale_rewards",
    "multi_objective_aggregation",
    "reward_weights",
    "mask_truncated_completions",
    "top_entropy_quantile",
    "entropy_coef",
    "disable_dropout",
    "optim",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "seed",
    "use_vllm",
)


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Evaluation (jaxvlm's evaluator for every model) and the loss on one shared batch
# ----------------------------------------------------------------------------------------------------------


def evaluate_checkpoint(cfg, model_dir: str, workdir: str) -> dict[str, float]:
    """jaxvlm's held-out evaluation of the checkpoint `model_dir`: the evaluation the trainer runs at the end of the
    config's grpo stage (`evaluation.task_for_stage`: config.eval's examples, the stage's prompt format and accuracy
    reward, greedy), on that checkpoint's weights."""
    from jaxvlm import evaluation, runtime

    cfg = copy.deepcopy(cfg)
    cfg.model.path, cfg.model.preset = model_dir, ""
    spec = configuration.resolve(cfg)
    configuration.check_files(spec)
    rt = runtime.setup(spec, workdir)
    try:
        task = evaluation.task_for_stage(spec.eval, spec.stage(grpo_stage_name(cfg)))
        return evaluation.evaluate(rt, rt.init_params, task, os.path.join(workdir, "eval_completions.jsonl"))
    finally:
        rt.writer.close()


def loss_parity(cfg, workdir: str, policy_dir: str | None = None) -> dict[str, Any]:
    """Both implementations' GRPO loss on one batch: jaxvlm's rollouts of the stage's first step (its sampler, the
    trainer's key), scored with the policy `policy_dir` (default: the checkpoint itself, i.e. step 0), old
    log-probs = the sampler's, the reference = the checkpoint. jaxvlm: `train_steps.grpo_loss_fn` with the batch as
    one micro-batch; TRL: `GRPOTrainer._compute_loss` on the same rows (the sampler's old log-probs given, its own
    reference forward). Returns both losses, KL and clip fractions and gradient norms, and the largest log-prob
    differences over completion tokens."""
    import jax
    import optax

    from jaxvlm import models, rollouts, runtime, train_steps
    from jaxvlm.data import sources

    spec, stage, plan = resolved_stage(cfg)
    rt = runtime.setup(spec, workdir)
    try:
        iterator = iter(sources.input_pipeline(plan.data(), rt.tokenizer, rt.image_processor, rt.model_config))
        batch = next(iterator)
        getattr(iterator, "close", lambda: None)()
        key = jax.random.fold_in(jax.random.key(rt.seed), zlib.crc32(stage.name.encode()))
        out, _ = rollouts.rollout(rt, stage, rt.init_params, batch, jax.random.fold_in(key, 0))
        rows, mb = rollouts.grpo_update_batch(
            out.rows,
            out.scores.total,
            stage.sampling.num_generations,
            stage.loss.advantage_scale,
            (1, 1),
            row_pixels=None,
            vision_config=None,
            slot_multiple=1,
        )
        policy = rt.init_params if policy_dir is None else models.load_pretrained(policy_dir, **spec.model.overrides)[1]
        logprobs = rollouts.reference_logprobs_fn(rt.model, 2, stage.loss.temperature)  # [1, 1, R, N]
        if stage.loss.beta > 0:
            mb["ref_logp"] = logprobs(rt.init_params, mb)
        logp = logprobs(policy, mb)[0, 0]
        micro = jax.tree.map(lambda x: x[0], mb)  # [M = 1, R, ...]

        def loss_fn(params, m):
            return train_steps.grpo_loss_fn(params, m, model=rt.model, cfg=stage.loss)

        grads, loss, metrics = jax.jit(lambda p, m: train_steps.accumulate_gradients(loss_fn, p, m))(policy, micro)
        jax_side = {
            "loss": float(loss),
            "kl": float(metrics["kl"]),
            "clip_fraction": float(metrics["clip_region_fraction"]),
            "grad_norm": float(optax.global_norm(grads)),
        }
        jax_logp = np.asarray(logp)
        jax_ref = None if stage.loss.beta == 0 else np.asarray(mb["ref_logp"])[0, 0]
        trl_side, trl_logp, trl_ref = trl_loss_on_rows(cfg, plan_rows(batch, stage), rows, policy_dir, workdir)
    finally:
        rt.writer.close()
    mask = np.asarray(rows["completion_mask"]) > 0
    result: dict[str, Any] = {f"jaxvlm_{k}": v for k, v in jax_side.items()}
    result.update({f"trl_{k}": v for k, v in trl_side.items()})
    result.update(
        policy="step 0 (the checkpoint)" if policy_dir is None else policy_dir,
        rows=int(mask.shape[0]),
        tokens=int(mask.sum()),
        loss_abs_diff=abs(jax_side["loss"] - trl_side["loss"]),
        grad_norm_rel_diff=abs(jax_side["grad_norm"] - trl_side["grad_norm"]) / max(jax_side["grad_norm"], 1e-30),
        logp_max_abs_diff=float(np.abs(jax_logp - trl_logp)[mask].max()),
        sampler_vs_trl_logp_max_abs_diff=float(np.abs(np.asarray(rows["old_logp"]) - trl_logp)[mask].max()),
    )
    if jax_ref is not None:
        result["ref_logp_max_abs_diff"] = float(np.abs(jax_ref - trl_ref)[mask].max())
    return result


def trl_loss_on_rows(cfg, prompts: list[dict], rows: Mapping[str, np.ndarray], policy_dir: str | None, workdir: str):
    """TRL's loss, KL, clip fraction and gradient norm on jaxvlm's rollout rows [R, ...] as one micro-batch, and
    the TRL policy's and reference's per-token log-probs [R, N] (None without a KL term). `prompts`: the planned
    prompts of those rows (one per group)."""
    from transformers import AutoModelForCausalLM

    num_rows = int(rows["completion_ids"].shape[0])
    trainer, _ = trl_trainer(
        cfg,
        [prompts],
        os.path.join(workdir, "trl"),
        generation_batch_size=num_rows,
        per_device_train_batch_size=num_rows,
        gradient_accumulation_steps=1,
    )
    torch = _torch_setup(cfg.seed)
    model = trainer.model
    if policy_dir is not None:
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).state_dict())
    model.train()
    trainer.current_gradient_accumulation_steps = 1

    inputs = _trl_inputs(trainer, rows, True)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].shape[1]
        )
    ref = inputs.get("ref_per_token_logps")
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    logged = trainer._metrics["train"]
    # TRL logs clip_ratio/region_mean for the clipped loss types, cispo_clip_ratio for "cispo", nothing for "sapo"
    clipped = logged.get("clip_ratio/region_mean") or logged.get("cispo_clip_ratio") or [0.0]
    side = {
        "loss": float(loss.detach()),
        "kl": float(logged["kl"][-1]) if logged.get("kl") else 0.0,
        "clip_fraction": float(clipped[-1]),
        "grad_norm": float(grad_norm),
    }
    return side, logp.numpy(), None if ref is None else ref.numpy()


# ----------------------------------------------------------------------------------------------------------
# The run: seeds, results.json, results.png
# ----------------------------------------------------------------------------------------------------------


def check_same_prompts(plan: Sequence[Sequence[dict]], scored: Sequence[Sequence[str]], side: str) -> None:
    """The example ids a side scored, step by step, are the planned ones; ValueError naming the first step that
    differs."""
    planned = [[row["id"] for row in rows] for rows in plan]
    if len(scored) != len(planned):
        raise ValueError(f"{side} scored {len(scored)} steps of prompts, the plan has {len(planned)}")
    for step, (want, got) in enumerate(zip(planned, scored)):
        if list(got) != want:
            raise ValueError(f"{side} step {step + 1}: scored prompts {got} but the plan has {want}")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_seed(cfg, out: str, seed: int, steps: int, results: dict, save, replay: bool = False) -> None:
    """Both sides for one seed, their prompt check, the parity checks and the TRL model's evaluation, each part
    written to `results` (and saved) as soon as it is done; parts already there are not run again."""
    from transformers import AutoTokenizer

    from jaxvlm import runtime

    model_path = cfg.model.path
    cfg = bench_config(cfg, model_path, seed, steps)
    spec, _, _ = resolved_stage(cfg)
    entry = results["seeds"].setdefault(str(seed), {})
    root = os.path.join(out, f"seed{seed}")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    plan = prompt_plan(cfg, tokenizer, runtime.model_config(spec.model))
    check_prompt_tokens(plan, tokenizer)
    first = plan[0][0]
    entry["first_prompt"] = {
        "id": first["id"],
        "jaxvlm": tokenizer.decode(first["prompt_ids"]),
        "trl": tokenizer.apply_chat_template(trl_messages(first["text"]), tokenize=False, add_generation_prompt=True),
    }
    print(f"seed {seed}, first prompt ({first['id']}), as both sides render it:\n{entry['first_prompt']['trl']}")
    if "parity_step0" not in entry:
        entry["parity_step0"] = loss_parity(cfg, os.path.join(root, "parity_step0"))
        save()
    if "jaxvlm" not in entry:
        load = os.getloadavg()
        entry["jaxvlm"] = run_jaxvlm(cfg, os.path.join(root, "jaxvlm"))
        entry["jaxvlm"]["load_average"] = {"start": load, "end": os.getloadavg()}
        save()
    check_same_prompts(plan, entry["jaxvlm"]["scored_ids"], "jaxvlm's trainer")
    if "parity_trained" not in entry:
        entry["parity_trained"] = loss_parity(
            cfg, os.path.join(root, "parity_trained"), policy_dir=entry["jaxvlm"]["final_model"]
        )
        save()
    if "trl" not in entry:
        trl_dir = os.path.join(root, "trl")
        shutil.rmtree(trl_dir, ignore_errors=True)
        load = os.getloadavg()
        entry["trl"] = run_trl(cfg, plan, trl_dir)
        entry["trl"]["load_average"] = {"start": load, "end": os.getloadavg()}
        save()
    check_same_prompts(plan, entry["trl"]["scored_ids"], "TRL's GRPOTrainer")
    entry["prompts_equal"] = True
    if replay and "replay" not in entry:
        trl_dir = os.path.join(root, "trl_replay")
        shutil.rmtree(trl_dir, ignore_errors=True)
        entry["replay"] = replay_in_trl(cfg, plan, entry["jaxvlm"], trl_dir)
        save()
    if "eval_after" not in entry["trl"]:
        entry["trl"]["eval_after"] = evaluate_checkpoint(cfg, entry["trl"]["model_dir"], os.path.join(root, "eval_trl"))
        save()


def plot(results: dict, path: str) -> None:
    """Reward per step (each seed thin, the mean over seeds thick) and wall time per step, both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for side, color in (("jaxvlm", "C0"), ("trl", "C3")):
        curves, times = [], []
        for _, entry in sorted(results["seeds"].items()):
            if side not in entry:
                continue
            steps = entry[side]["steps"]
            x = [s["step"] for s in steps]
            y = [np.nan if s["reward"] is None else s["reward"] for s in steps]
            t = [np.nan if s["wall_s"] is None else s["wall_s"] for s in steps]
            ax_reward.plot(x, y, color=color, alpha=0.35, linewidth=0.8)
            ax_time.plot(x, t, color=color, alpha=0.35, linewidth=0.8)
            curves.append(y)
            times.append(t)
        if not curves:
            continue
        n = min(len(c) for c in curves)
        label = f"{side} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})"
        ax_reward.plot(range(1, n + 1), np.nanmean([c[:n] for c in curves], 0), color=color, linewidth=2.2, label=label)
        ax_time.plot(range(1, n + 1), np.nanmean([t[:n] for t in times], 0), color=color, linewidth=2.2, label=label)
    ax_reward.set_xlabel("rollout step")
    ax_reward.set_ylabel("mean reward (total)")
    ax_reward.set_title("reward per step")
    ax_reward.legend(fontsize=8)
    ax_time.set_xlabel("rollout step")
    ax_time.set_ylabel("seconds")
    ax_time.set_yscale("log")
    ax_time.set_title("wall time per step (jaxvlm's first step compiles)")
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict) -> str:
    """A few lines per seed: rewards over the first and last steps, median step times, held-out accuracy."""
    lines = [f"base model held-out accuracy {results['base_eval']['accuracy']:.4f}"]
    for seed, entry in sorted(results["seeds"].items()):
        for side in ("jaxvlm", "trl"):
            if side not in entry:
                continue
            steps = entry[side]["steps"]
            rewards_ = [s["reward"] for s in steps if s["reward"] is not None]
            walls = [s["wall_s"] for s in steps[1:] if s["wall_s"] is not None] or [steps[0]["wall_s"]]
            rollout = [s["rollout_s"] for s in steps[1:] if s.get("rollout_s") is not None] or [np.nan]
            third = max(1, len(rewards_) // 3)
            acc = (entry[side].get("eval_after") or {}).get("accuracy")
            lines.append(
                f"seed {seed} {side:>6}: reward first third {np.mean(rewards_[:third]):.3f}, last third "
                f"{np.mean(rewards_[-third:]):.3f}; median step {np.median(walls):.2f} s (sampling "
                f"{np.median(rollout):.2f} s); held-out accuracy "
                f"{'n/a' if acc is None else f'{acc:.4f}'}"
            )
        if "replay" in entry:
            r = entry["replay"]
            lines.append(
                f"seed {seed} replay (TRL trained on jaxvlm's rollouts): loss max |diff| {r['loss_max_abs_diff']:.1e}, "
                f"KL max |diff| {r['kl_max_abs_diff']:.1e}, grad norm max rel diff {r['grad_norm_max_rel_diff']:.1e}, "
                f"final weights |jaxvlm - TRL| / |jaxvlm - base| {r['final_weights_rel_diff']:.1e}"
            )
        for name in ("parity_step0", "parity_trained"):
            if name in entry:
                p = entry[name]
                lines.append(
                    f"seed {seed} {name}: loss jaxvlm {p['jaxvlm_loss']:.7f} trl {p['trl_loss']:.7f} "
                    f"(|diff| {p['loss_abs_diff']:.1e}), grad norm rel diff {p['grad_norm_rel_diff']:.1e}, "
                    f"log-prob max diff {p['logp_max_abs_diff']:.1e}"
                )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="a Hugging Face checkpoint directory (text-only)")
    parser.add_argument("--config", required=True, help="configs/<recipe>.py[:variant] with one grpo stage")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0, help="rollout steps (0: the config's)")
    parser.add_argument(
        "--replay",
        action="store_true",
        help="also train TRL on jaxvlm's recorded rollouts, step by step (replay_in_trl)",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfg = load_config(args.config)
    cfg = bench_config(cfg, os.path.abspath(args.model_path), int(cfg.seed), args.steps)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    results.update(
        command=" ".join(["python -m jaxvlm.bench.trl_grpo", *(argv if argv is not None else sys.argv[1:])]),
        config=args.config,
        model_path=cfg.model.path,
        versions=versions(),
        hyperparameters={
            "jaxvlm": _plain(jaxvlm_hyperparameters(cfg)),
            "trl_mapped": _plain(grpo_config_from_jaxvlm(cfg)),
        },
    )
    results.setdefault("seeds", {})

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1, default=_plain)
        os.replace(path + ".tmp", path)

    if "base_eval" not in results:
        results["base_eval"] = evaluate_checkpoint(cfg, cfg.model.path, os.path.join(args.out, "eval_base"))
        save()
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_seed(cfg, args.out, seed, args.steps, results, save, replay=args.replay)
        for side in ("jaxvlm", "trl"):
            results["seeds"][str(seed)][side]["eval_before"] = results["base_eval"]
        save()
        plot(results, os.path.join(args.out, "results.png"))
    print(summary(results), flush=True)
    print(f"wrote {path} and {os.path.join(args.out, 'results.png')}")
    return results


if __name__ == "__main__":
    main()
