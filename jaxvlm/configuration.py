"""The shape of a training config: `base_config()`, `stage(mode)`, and `check_config` (fails at start-up).

A recipe config (big_vision style: `configs/<recipe>.py` with `get_config(arg)`) is::

    seed                       int
    model.{preset, path, tokenizer, dtype, param_dtype, remat, attention, logits_chunk, vocab_chunk, min_pixels,
           max_pixels}
    mesh.shape                 (data, fsdp, tensor); -1 = the remaining devices
    train.{log_every, eval_every, save_every, keep_checkpoints, max_consecutive_skips, progress, tensorboard}
    eval.{sources, num_examples, batch_size, max_new_tokens, save_completions}
    stage_order                ("sft", "grpo", ...): names of `stages` entries, run in this order
    stages.<name>              a stage (see `stage`): mode, steps/epochs, data, rewards, optimizer, loss, sampling,
                               batch, rejection

Every leaf has a default here, so `--config.stages.grpo.loss.eps_low=0.1` works for any recipe and a misspelt
key (`--config.stages.grpo.loss.eps_lw=0.1`) or a wrong type is rejected by ml_collections before anything runs.
`check_config` then checks values and cross-field rules, naming the offending key.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxvlm.data.pipeline import PipelineConfig
from jaxvlm.train_steps import LossConfig, OptimizerConfig

STAGE_MODES = ("sft", "grpo", "dyme", "rejection_sft")
RL_MODES = ("grpo", "dyme")


def gym_source(split: str, num_examples: int, tasks: tuple[str, ...] | None = None, **kwargs) -> dict:
    """A gym source entry (see `jaxvlm.data.sources`)."""
    entry = {"kind": "gym", "split": split, "num_examples": num_examples, **kwargs}
    if tasks is not None:
        entry["tasks"] = tuple(tasks)
    return entry


def _data_config(**overrides) -> ml_collections.ConfigDict:
    fields = {f.name: f.default for f in dataclasses.fields(PipelineConfig) if f.name != "batch_size"}
    fields.update(batch_size=8, sources=[], with_targets=False)
    d = ml_collections.ConfigDict(fields)
    d.num_epochs = ml_collections.FieldReference(None, field_type=int)
    d.update(overrides)
    return d


def _dataclass_config(cls, **overrides) -> ml_collections.ConfigDict:
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    d = ml_collections.ConfigDict(values)
    for name, value in values.items():
        if value is None:  # typed None so that --config overrides can set a number
            d[name] = ml_collections.FieldReference(None, field_type=float)
    d.update(overrides)
    return d


def stage(mode: str, **overrides) -> ml_collections.ConfigDict:
    """A stage with every key at its default; `overrides` (nested dicts allowed) replace some.

    mode: sft (targets from `data`), grpo, dyme, rejection_sft (sample, filter, then SFT on the kept set).
    steps: optimizer steps of the stage (one rollout batch per step for RL: K * μ updates); 0 = use epochs.
    epochs: passes over the stage's (first) data source when steps = 0.
    batch: micro_batches M (gradient accumulation) and mini_batches K (RL: updates per rollout batch).
    rejection: num_samples per prompt, min_reward to keep, num_prompts, text_share of text-only examples mixed
      into the SFT set and their sources, sampling temperature.
    """
    if mode not in STAGE_MODES:
        raise ValueError(f"stage mode must be one of {STAGE_MODES}, got {mode!r}")
    s = ml_collections.ConfigDict()
    s.mode = mode
    s.steps = 10
    s.epochs = 0
    s.data = _data_config()
    s.rewards = []
    s.accuracy_reward = "accuracy"  # the reward (display name) used as correctness: DyME's switch, eval, rejection
    s.optimizer = _dataclass_config(OptimizerConfig, frozen=(), no_decay=(r"bias$", r"scale$"))
    s.loss = _dataclass_config(LossConfig)
    s.sampling = ml_collections.ConfigDict(dict(
        num_generations=4, max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
    ))
    s.batch = ml_collections.ConfigDict(dict(micro_batches=1, mini_batches=1))
    s.rejection = ml_collections.ConfigDict(dict(
        num_samples=4, min_reward=1.0, num_prompts=64, text_share=0.0, text_sources=[], temperature=1.0,
        batch_size=8,
    ))
    _deep_update(s, overrides)
    return s


def _deep_update(config: ml_collections.ConfigDict, overrides: dict) -> None:
    for key, value in overrides.items():
        if key not in config:
            raise KeyError(f"unknown stage key {key!r}; known: {sorted(config.keys())}")
        if isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
            _deep_update(config[key], value)
        else:
            config[key] = value


def model_options(model_section) -> dict:
    """The ModelConfig fields a run's `config.model` sets on top of a preset or checkpoint (numerics, memory)."""
    return {k: model_section[k]
            for k in ("dtype", "param_dtype", "remat", "attention", "logits_chunk", "vocab_chunk")}


def base_config() -> ml_collections.ConfigDict:
    """Everything but the stages, at defaults that run on a CPU with the built-in tiny model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny",  # jaxvlm.models.config.PRESETS entry used when `path` is empty (random weights)
        path="",  # a local Hugging Face checkpoint directory (Qwen2.5-VL, or Qwen2/Qwen2.5 for text-only)
        tokenizer="",  # tokenizer directory; "" = the checkpoint's, or the built-in gym tokenizer for presets
        dtype="float32", param_dtype="float32",
        remat="auto",  # auto | none | full | attention | dots: what each layer keeps for the backward ("auto":
        # none below 0.5B parameters, full above; jaxvlm.models.config.default_remat)
        attention="auto",  # auto | xla | cudnn | splash: the attention kernel (jaxvlm.models.attention)
        logits_chunk=512,  # completion tokens per LM-head chunk when scoring
        vocab_chunk=32768,  # vocabulary entries per LM-head chunk when scoring
        min_pixels=56 * 56, max_pixels=56 * 56,  # image processor bounds (Curr-ReFT: max 401408)
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
    c.train = ml_collections.ConfigDict(dict(
        log_every=1, eval_every=0, save_every=50, keep_checkpoints=2, max_consecutive_skips=3, progress=True,
        tensorboard=True,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        sources=[gym_source("validation", 64)], num_examples=64, batch_size=16, max_new_tokens=64,
        # Every evaluation's greedy completions, with their scores, to <workdir>/eval_completions/ (what the model
        # actually writes: accuracy does not show whether its reasoning reads the input).
        save_completions=True,
    ))
    c.stage_order = ()
    c.stages = ml_collections.ConfigDict()
    return c


# ----------------------------------------------------------------------------------------------------------
# Checks (start-up)
# ----------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _err(key: str, message: str) -> ConfigError:
    return ConfigError(f"config.{key}: {message}")


def optimizer_config(s: ml_collections.ConfigDict, total_steps: int) -> OptimizerConfig:
    values = s.optimizer.to_dict()
    values["frozen"] = tuple(values["frozen"])
    values["no_decay"] = tuple(values["no_decay"])
    values["total_steps"] = total_steps
    return OptimizerConfig(**values)


def loss_config(s: ml_collections.ConfigDict) -> LossConfig:
    values = s.loss.to_dict()
    values["group_size"] = int(s.sampling.num_generations) if s.mode in RL_MODES else values["group_size"]
    if s.mode in RL_MODES:
        values["temperature"] = float(s.sampling.temperature) or 1.0
    cfg = LossConfig(**values)
    cfg.validate()
    return cfg


def check_config(c: ml_collections.ConfigDict) -> None:
    """Value and cross-field checks of a full config; raises ConfigError naming the key."""
    if not c.stage_order:
        raise _err("stage_order", "no stages to run")
    for name in c.stage_order:
        if name not in c.stages:
            raise _err("stage_order", f"names stage {name!r}, but config.stages has {sorted(c.stages.keys())}")
    if len(set(c.stage_order)) != len(c.stage_order):
        raise _err("stage_order", f"a stage appears twice: {c.stage_order}")
    shape = tuple(c.mesh.shape)
    if len(shape) != 3 or sum(d == -1 for d in shape) > 1 or any(d == 0 or d < -1 for d in shape):
        raise _err("mesh.shape", f"must be 3 sizes (data, fsdp, tensor) with at most one -1, got {shape}")
    if c.train.max_consecutive_skips < 1:
        raise _err("train.max_consecutive_skips", "must be >= 1")
    for name in c.stage_order:
        s = c.stages[name]
        key = f"stages.{name}"
        if s.mode not in STAGE_MODES:
            raise _err(f"{key}.mode", f"must be one of {STAGE_MODES}, got {s.mode!r}")
        if s.steps < 0 or s.epochs < 0 or (s.steps == 0 and s.epochs == 0):
            raise _err(f"{key}.steps", "give a positive number of steps, or steps=0 and epochs > 0")
        if not s.data.sources:
            raise _err(f"{key}.data.sources", "empty: the stage needs data")
        try:
            PipelineConfig.from_dict({k: v for k, v in s.data.to_dict().items() if k != "sources"})
        except (ValueError, TypeError) as error:
            raise _err(f"{key}.data", str(error)) from None
        try:
            cfg = loss_config(s)
            optimizer_config(s, max(1, s.steps))
        except (ValueError, TypeError) as error:
            raise _err(f"{key}.loss", str(error)) from None
        m, k = s.batch.micro_batches, s.batch.mini_batches
        if m < 1 or k < 1:
            raise _err(f"{key}.batch", "micro_batches and mini_batches must be >= 1")
        if s.mode in ("sft", "rejection_sft"):
            if s.data.batch_size % m:
                raise _err(f"{key}.batch.micro_batches", f"{m} does not divide data.batch_size={s.data.batch_size}")
        if s.mode in RL_MODES or s.mode == "rejection_sft":
            if not s.rewards:
                raise _err(f"{key}.rewards", f"a {s.mode} stage needs rewards")
            from jaxvlm import rewards

            try:
                specs = rewards.parse_reward_specs(list(s.rewards))
            except (ValueError, KeyError) as error:
                raise _err(f"{key}.rewards", str(error)) from None
            if s.mode == "dyme" and s.accuracy_reward not in rewards.display_names(specs):
                raise _err(f"{key}.accuracy_reward", f"{s.accuracy_reward!r} is not one of the stage's rewards "
                           f"{rewards.display_names(specs)}")
        if s.mode in RL_MODES:
            g = s.sampling.num_generations
            if g < 2:
                raise _err(f"{key}.sampling.num_generations", "group advantages need >= 2 rollouts per prompt")
            rows = s.data.batch_size * g
            if rows % (m * k):
                raise _err(f"{key}.batch", f"{rows} rollout rows (batch_size x num_generations) cannot be cut into "
                           f"{k} mini-batches x {m} micro-batches")
            if s.mode == "dyme" and cfg.beta > 0:
                raise _err(f"{key}.loss.beta", "DyME trains without a KL term (the authors assert beta == 0)")
        if s.mode == "rejection_sft":
            if s.rejection.num_samples < 1 or s.rejection.num_prompts < 1:
                raise _err(f"{key}.rejection", "num_samples and num_prompts must be >= 1")
            if not 0.0 <= s.rejection.text_share < 1.0:
                raise _err(f"{key}.rejection.text_share", "must be in [0, 1)")
            if s.rejection.text_share > 0 and not s.rejection.text_sources:
                raise _err(f"{key}.rejection.text_sources", "text_share > 0 needs text-only sources")


# ----------------------------------------------------------------------------------------------------------
# Helpers for recipe files
# ----------------------------------------------------------------------------------------------------------


def check_variant(arg: str | None, variants: tuple[str, ...], config_file: str) -> str:
    """The variant named by `--config <file>:<arg>` ("" for none); ValueError listing the variants otherwise."""
    variant = "" if arg is None else str(arg)
    if variant not in variants:
        raise ValueError(f"{config_file}: unknown variant {variant!r}; variants: "
                         f"{', '.join(repr(v) for v in variants)} ('' = the paper's / full-size defaults)")
    return variant


def use_tiny_model(c: ml_collections.ConfigDict, eval_tasks, *, max_new_tokens: int = 32,
                   eval_examples: int = 16) -> None:
    """The `:tiny` runtime: the tiny random-weight preset with the built-in tokenizer, 56 px images, one device,
    a short greedy eval on the gym's validation split of `eval_tasks`, frequent checkpoints."""
    c.model.update(preset="tiny", path="", dtype="float32", param_dtype="float32", min_pixels=56 * 56,
                   max_pixels=56 * 56)
    c.mesh.shape = (1, 1, 1)
    c.train.update(save_every=2, keep_checkpoints=1)
    c.eval.update(sources=[gym_source("validation", eval_examples, tasks=tuple(eval_tasks))], num_examples=8,
                  batch_size=8, max_new_tokens=max_new_tokens)
