"""The shape of a training config and its start-up resolution into typed, frozen specs.

A recipe config (big_vision style: `configs/<recipe>.py` with `get_config(arg)`) is::

    seed                       int
    model.{preset | path, tokenizer, dtype, param_dtype, remat, attention, logits_chunk, vocab_chunk, lora, min_pixels,
           max_pixels}
    mesh.shape                 (data, fsdp, tensor); -1 = the remaining devices
    train.{log_every, eval_every, save_every, keep_checkpoints, max_consecutive_skips, progress, tensorboard}
    eval.{sources, num_examples, batch_size, sampling.{...}, save_completions}
    stage_order                ("sft", "grpo", ...): names of `stages` entries, run in this order
    stages.<name>              a stage: `stage(mode, ...)`, with exactly the keys its mode reads (jaxvlm.stages)

Every key has a default, so `--config.stages.grpo.loss.eps_low=0.1` works for any recipe, and a misspelt key
(`--config.stages.grpo.loss.eps_lw=0.1`) or a wrong type is rejected by ml_collections before anything runs.
`resolve(config)` then checks values and cross-field rules, naming the offending key, and returns a `RunSpec`:
the only thing the run reads. A value derived from another key (an RL stage's `loss.temperature` and
`loss.group_size` from its `sampling`, `optimizer.total_steps` from the stage length) is left unset (None); set to
a value that disagrees with its source, it is a start-up error naming both keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import ml_collections
from absl import logging

from jaxvlm import checks
from jaxvlm.data.pipeline import PipelineConfig
from jaxvlm.sampling import SamplingParams
from jaxvlm.train_steps import LossConfig, OptimizerConfig


def gym_source(split: str, num_examples: int, tasks: tuple[str, ...] | None = None, **kwargs) -> dict:
    """A gym source entry (see `jaxvlm.data.sources`)."""
    entry = {"kind": "gym", "split": split, "num_examples": num_examples, **kwargs}
    if tasks is not None:
        entry["tasks"] = tuple(tasks)
    return entry


def typed_none(field_type=int) -> ml_collections.FieldReference:
    """A key whose default is None that `--config` overrides may still set to a `field_type` value."""
    return ml_collections.FieldReference(None, field_type=field_type)


def stage(mode: str, **overrides) -> ml_collections.ConfigDict:
    """A stage of `mode` (jaxvlm.stages.MODES) with every key its mode reads at its default; `overrides` (nested
    dicts allowed) replace some. A key the mode does not read is an error here, as on the command line."""
    from jaxvlm import stages

    s = stages.get(mode).defaults()
    s.mode = mode
    _deep_update(s, overrides, f"stage({mode!r})")
    return s


def _deep_update(config: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        if key not in config:
            raise KeyError(f"{where}: unknown key {key!r}; a stage of this mode has {sorted(config.keys())}")
        if isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
            _deep_update(config[key], value, f"{where}.{key}")
        else:
            config[key] = value


def sampling_section(**values) -> ml_collections.ConfigDict:
    """A `sampling` section: the user-settable `SamplingParams` fields (stop ids and the like come from the model)."""
    fields = dict(num_generations=1, max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    fields.update(values)
    return ml_collections.ConfigDict(fields)


def evaluation_config() -> ml_collections.ConfigDict:
    """A config without training (`python -m jaxvlm.evaluate`): seed, model, mesh and eval stages only."""
    c = base_config()
    del c["train"], c["eval"]
    c.model.preset = ""  # evaluate a checkpoint: --config.model.path=DIR
    return c


def lora_section() -> ml_collections.ConfigDict:
    from jaxvlm.models.config import DEFAULT_LORA_TARGETS

    return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=DEFAULT_LORA_TARGETS, path=""))


def base_config() -> ml_collections.ConfigDict:
    """Everything but the stages, at defaults that run on a CPU with the built-in tiny model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",  # jaxvlm.models.config.PRESETS entry: random weights (set "" to give a `path` instead)
            path="",  # a local Hugging Face checkpoint directory (Qwen2.5-VL, or Qwen2/Qwen2.5 for text-only)
            tokenizer="",  # tokenizer directory; "" = the checkpoint's, or the built-in gym tokenizer for presets
            dtype="float32",
            param_dtype="float32",
            remat="auto",  # auto | none | full | attention | dots: what each layer keeps for the backward ("auto":
            # none below 0.5B parameters, full above; jaxvlm.models.config.default_remat)
            attention="auto",  # auto | xla | cudnn | splash: the attention kernel (jaxvlm.models.attention)
            logits_chunk=512,  # completion tokens per LM-head chunk when scoring
            vocab_chunk=32768,  # vocabulary entries per LM-head chunk when scoring
            min_pixels=56 * 56,
            max_pixels=56 * 56,  # image processor bounds (Curr-ReFT: max 401408)
            # LoRA (jaxvlm.models.lora): rank 0 trains every weight; rank > 0 trains low-rank adapters on the linear
            # layers whose paths match `targets` (regexes; default the decoder's attention and MLP projections), the
            # base frozen. y = x W + (dropout(x) A) B * alpha / rank. `path`: start from a PEFT adapter directory.
            lora=lora_section(),
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
    c.train = ml_collections.ConfigDict(
        dict(
            log_every=1,
            eval_every=0,
            save_every=50,
            keep_checkpoints=2,
            max_consecutive_skips=3,
            progress=True,
            tensorboard=True,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            sources=[gym_source("validation", 64)],
            num_examples=64,
            batch_size=16,
            sampling=sampling_section(temperature=0.0),  # greedy; num_generations k > 1 with temperature > 0: pass@k
            # Every evaluation's completions, with their scores, to <workdir>/eval_completions/ (what the model actually
            # writes: accuracy does not show whether its reasoning reads the input).
            save_completions=True,
        )
    )
    c.stage_order = ()
    c.stages = ml_collections.ConfigDict()
    return c


# ----------------------------------------------------------------------------------------------------------
# Specs: what the run reads
# ----------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def config_error(key: str, message: str) -> ConfigError:
    return ConfigError(f"config.{key}: {message}")


@contextlib.contextmanager
def errors_under(key: str):
    """A settings dataclass's FieldError (or ValueError / TypeError) raised inside becomes a ConfigError naming
    the key path: `config.<key>.<field>`."""
    try:
        yield
    except ConfigError:
        raise
    except checks.FieldError as error:
        raise config_error(f"{key}.{error.field}" if key else error.field, error.message) from None
    except (ValueError, TypeError) as error:
        raise config_error(key, str(error)) from None


def check_section(section, rules: dict[str, checks.Rule], key: str) -> None:
    """`rules` on the keys of a config section; ConfigError naming `config.<key>.<field>`."""
    with errors_under(key):
        checks.check_fields(section, rules)


MODEL_OPTIONS = ("dtype", "param_dtype", "remat", "attention", "logits_chunk", "vocab_chunk")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`config.model`: a preset (random weights) or a checkpoint directory, and the options set on top of it."""

    preset: str
    path: str
    tokenizer: str
    options: tuple[tuple[str, Any], ...]  # (ModelConfig field, value) for MODEL_OPTIONS, and "lora" with LoRA on
    min_pixels: int
    max_pixels: int
    lora_path: str = ""  # a PEFT adapter directory to start the adapters from

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.options)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    log_every: int
    eval_every: int  # 0: only at the end of each stage
    save_every: int
    keep_checkpoints: int
    max_consecutive_skips: int
    progress: bool
    tensorboard: bool


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """`config.eval`: what the evaluation during and after each training stage reads (its prompt format is the
    stage's)."""

    sources: tuple[dict, ...]
    num_examples: int
    batch_size: int
    sampling: SamplingParams
    save_completions: bool


@dataclasses.dataclass(frozen=True)
class RejectionSpec:
    """A rejection_sft stage's sampling phase: prompts from `data`, `sampling.num_generations` samples each."""

    min_reward: float
    num_prompts: int
    batch_size: int
    text_share: float
    text_sources: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage as its mode resolved it (`jaxvlm.stages`); `optimizer.total_steps` is filled when the stage's
    length is known (`jaxvlm.stages.base.plan`)."""

    name: str
    mode: str
    steps: int  # 0: from `epochs`
    epochs: int  # passes over the first data source; 0: no bound
    sources: tuple[dict, ...]
    data: PipelineConfig | None
    optimizer: OptimizerConfig | None
    total_steps: int | None  # optimizer.total_steps as set in the config (None: derived)
    loss: LossConfig | None
    micro_batches: int = 1
    mini_batches: int = 1
    sampling: SamplingParams | None = None
    rewards: tuple = ()  # rewards.RewardSpec
    accuracy_reward: str = ""
    rejection: RejectionSpec | None = None
    num_examples: int = 0  # eval stages: examples to score (0 = all)
    dynamic_sampling: Any = None  # grpo stages: jaxvlm.dynamic_sampling.DynamicSampling

    @property
    def key(self) -> str:
        return f"stages.{self.name}"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    seed: int
    model: ModelSpec
    mesh_shape: tuple[int, int, int]
    train: TrainSpec
    eval: EvalSpec | None  # None: no training stage (an evaluation config)
    stages: tuple[StageSpec, ...]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    @property
    def trains(self) -> bool:
        from jaxvlm import stages

        return any(stages.get(s.mode).trains for s in self.stages)


def resolve(c: ml_collections.ConfigDict) -> RunSpec:
    """Check a full config and turn it into the `RunSpec` the run reads; ConfigError names the key."""
    from jaxvlm import stages

    check_section(c, {"stage_order": checks.sequence_of(checks.text)}, "")
    if not c.stage_order:
        raise config_error("stage_order", "no stages to run")
    for name in c.stage_order:
        if name not in c.stages:
            raise config_error("stage_order", f"names stage {name!r}, but config.stages has {sorted(c.stages.keys())}")
    if len(set(c.stage_order)) != len(c.stage_order):
        raise config_error("stage_order", f"a stage appears twice: {c.stage_order}")
    unused = sorted(set(c.stages.keys()) - set(c.stage_order))
    if unused:  # e.g. --config.stage_order=sft to run a recipe's first stage: said, not silently skipped
        logging.warning(
            "config.stages %s are not in config.stage_order %s: they will not run", unused, tuple(c.stage_order)
        )
    check_known_keys(c, base_config(), "", skip=("stages",))
    check_section(c, {"seed": checks.integer(0)}, "")
    resolved = []
    for name in c.stage_order:
        section = c.stages[name]
        mode = section.get("mode")
        if mode not in stages.MODES:
            raise config_error(f"stages.{name}.mode", f"must be one of {tuple(stages.MODES)}, got {mode!r}")
        check_known_keys(section, stages.get(mode).defaults(), f"stages.{name}")
        resolved.append(stages.get(mode).resolve(section, name, seed=int(c.seed)))
    trains = any(stages.get(s.mode).trains for s in resolved)
    for s in resolved:  # the reward each stage's evaluation scores with, checked now (e.g. math-verify installed)
        if stages.get(s.mode).trains:
            from jaxvlm import evaluation, rewards

            try:
                rewards.parse_reward_specs(
                    [evaluation.accuracy_spec(s.rewards, s.accuracy_reward, s.data.prompt_style)]
                )
            except ValueError as error:
                raise config_error(f"{s.key}.accuracy_reward", f"its evaluation's reward: {error}") from None
    if trains and ("eval" not in c or "train" not in c):
        raise config_error(
            "eval" if "eval" not in c else "train",
            "a config with training stages needs this section (configuration.base_config() has it)",
        )
    return RunSpec(
        seed=int(c.seed),
        model=resolve_model(c.model),
        mesh_shape=resolve_mesh(c.mesh),
        train=resolve_train(c.train) if "train" in c else NO_TRAINING,
        eval=resolve_eval(c.eval) if "eval" in c else None,
        stages=tuple(resolved),
    )


def check_known_keys(
    section: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, key: str, skip: tuple[str, ...] = ()
) -> None:
    """Every key of `section` exists in `schema` (recursively): a key added by a recipe file (`ConfigDict.update`
    adds unknown keys) would otherwise be read by nothing."""
    for name, value in section.items():
        path = f"{key}.{name}" if key else name
        if name in skip:
            continue
        if name not in schema:
            raise config_error(path, f"not a key here, so nothing would read it; the keys are {sorted(schema.keys())}")
        if isinstance(value, ml_collections.ConfigDict) and isinstance(schema[name], ml_collections.ConfigDict):
            check_known_keys(value, schema[name], path)


def check_config(c: ml_collections.ConfigDict) -> RunSpec:
    """`resolve`, for callers that only want the checks."""
    return resolve(c)


def _model_rules() -> dict[str, checks.Rule]:
    from jaxvlm.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

    return {
        "preset": checks.text,
        "path": checks.text,
        "tokenizer": checks.text,
        "dtype": checks.text,
        "param_dtype": checks.text,
        "remat": checks.one_of("auto", *REMAT_POLICIES),
        "attention": checks.one_of(*ATTENTION_IMPLEMENTATIONS),
        "logits_chunk": checks.integer(1),
        "vocab_chunk": checks.integer(1),
        "min_pixels": checks.integer(1),
        "max_pixels": checks.integer(1),
    }


def resolve_model(m: ml_collections.ConfigDict) -> ModelSpec:
    """`config.model` (a preset or a path, and MODEL_OPTIONS; a section without `tokenizer` or pixel bounds, as the
    benchmarks' and the forward check's, gets the defaults)."""
    rules = _model_rules()
    check_section(m, {k: rule for k, rule in rules.items() if k in m}, "model")
    if m.path and m.preset:
        raise config_error(
            "model.preset",
            f"{m.preset!r} is set together with config.model.path={m.path!r}: give one "
            "(--config.model.preset='' to use the checkpoint)",
        )
    if not m.path and not m.preset:
        raise config_error(
            "model.path",
            "this config trains a real checkpoint; set --config.model.path=/path/to/"
            "checkpoint (or --config.model.preset=tiny for a random-weight toy model)",
        )
    from jaxvlm.models.config import PRESETS, canonical_dtype

    if m.preset and m.preset not in PRESETS:
        raise config_error("model.preset", f"must be one of {tuple(PRESETS)} (or '' with model.path), got {m.preset!r}")
    min_pixels, max_pixels = int(m.get("min_pixels", 56 * 56)), int(m.get("max_pixels", 56 * 56))
    if not 0 < min_pixels <= max_pixels:
        raise config_error("model.min_pixels", f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    options = {k: m[k] for k in MODEL_OPTIONS}
    for k in ("dtype", "param_dtype"):  # one spelling: "bf16" and "bfloat16" are the same run
        try:
            options[k] = canonical_dtype(options[k], k)
        except ValueError as error:
            raise config_error(f"model.{k}", str(error)) from None
    lora = resolve_lora(m.get("lora"))
    if lora is not None:
        options["lora"] = lora
    return ModelSpec(
        preset=m.preset,
        path=m.path,
        tokenizer=m.get("tokenizer", ""),
        options=tuple(options.items()),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        lora_path=m.lora.path if "lora" in m else "",
    )


LORA_RULES = {
    "rank": checks.integer(0),
    "alpha": checks.number(0, lo_open=True),
    "dropout": checks.number(0, 1, hi_open=True),
    "targets": checks.sequence_of(checks.text),
    "path": checks.text,
}


def resolve_lora(section):
    """`config.model.lora` -> a LoraConfig, or None at rank 0 (LoRA off; then every other key must stay at its
    default, or it would be read by nothing)."""
    if section is None:
        return None
    check_section(section, LORA_RULES, "model.lora")
    from jaxvlm.models.config import LoraConfig

    if section.rank == 0:
        defaults = lora_section()
        for key in LORA_RULES:
            if key != "rank" and section[key] != defaults[key]:
                raise config_error(
                    f"model.lora.{key}",
                    f"{section[key]!r} is read only with LoRA on; set model.lora.rank > 0 (e.g. 16)",
                )
        return None
    try:
        return LoraConfig(
            rank=int(section.rank),
            alpha=float(section.alpha),
            dropout=float(section.dropout),
            targets=tuple(section.targets),
        )
    except ValueError as error:
        raise config_error("model.lora.targets", str(error)) from None


def check_files(spec: RunSpec) -> None:
    """What a resolved run reads from disk exists: the checkpoint and tokenizer directories, and every data source's
    files (stages, evaluation, rejection sampling's text sources). Run before anything is built or loaded."""
    from jaxvlm.data import sources

    check_local_directory(spec.model.path, "model.path", "config.json")
    check_local_directory(spec.model.tokenizer, "model.tokenizer", "tokenizer_config.json")
    check_local_directory(spec.model.lora_path, "model.lora.path", "adapter_config.json")
    named = [] if spec.eval is None else [("eval.sources", spec.eval.sources)]
    for s in spec.stages:
        named.append((f"{s.key}.data.sources", s.sources))
        if s.rejection is not None:
            named.append((f"{s.key}.rejection.text_sources", s.rejection.text_sources))
    for key, entries in named:
        for k, entry in enumerate(entries):
            with errors_under(f"{key}[{k}]"):
                sources.check_entry_files(entry)


def check_devices(spec: RunSpec, num_devices: int) -> None:
    """The mesh fits `num_devices`, and every training stage's batch splits over its data-parallel devices."""
    from jaxvlm import stages

    data, fsdp, _ = check_mesh_devices(spec.mesh_shape, num_devices)
    for s in spec.stages:
        if stages.get(s.mode).trains and s.data.batch_size % (data * fsdp):
            raise config_error(
                f"{s.key}.data.batch_size",
                f"{s.data.batch_size} rows cannot be split over the {data * fsdp} data-parallel devices "
                f"(data x fsdp) of mesh {spec.mesh_shape} on {num_devices} devices",
            )


def check_local_directory(path: str, key: str, marker: str) -> None:
    """`path` ("" = unset) is a local directory holding `marker`: nothing is ever fetched from a hub, so a path
    that does not exist is "not found" here, not a hub lookup error later."""
    if not path:
        return
    if "://" in path:
        raise config_error(key, f"{path!r}: a local directory is needed (nothing is downloaded)")
    if not os.path.exists(path):
        raise config_error(key, f"{path}: not found (a local directory is needed; nothing is downloaded)")
    if not os.path.isdir(path):
        raise config_error(key, f"{path}: not a directory")
    if not os.path.isfile(os.path.join(path, marker)):
        raise config_error(key, f"{path}: no {marker} in this directory: not a Hugging Face checkpoint / tokenizer")


def resolve_mesh(mesh: ml_collections.ConfigDict) -> tuple[int, int, int]:
    if not isinstance(mesh.shape, (list, tuple)):
        raise config_error("mesh.shape", f"must be 3 sizes (data, fsdp, tensor), got {mesh.shape!r}")
    shape = tuple(mesh.shape)
    if (
        len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or sum(d == -1 for d in shape) > 1
        or any(d == 0 or d < -1 for d in shape)
    ):
        raise config_error("mesh.shape", f"must be 3 sizes (data, fsdp, tensor) with at most one -1, got {shape}")
    return shape


def check_mesh_devices(shape: tuple[int, int, int], num_devices: int) -> tuple[int, int, int]:
    """The mesh shape with its -1 filled in for `num_devices` devices (ConfigError when they cannot fill it)."""
    fixed = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if num_devices % fixed:
            raise config_error("mesh.shape", f"{shape}: {num_devices} devices cannot fill it")
        return tuple(num_devices // fixed if d == -1 else d for d in shape)
    if fixed > num_devices:
        raise config_error("mesh.shape", f"{shape} needs {fixed} devices; {num_devices} are available")
    return shape


# The train section of a run without training stages (an evaluation config has none): metrics to JSONL only.
NO_TRAINING = TrainSpec(
    log_every=1,
    eval_every=0,
    save_every=1,
    keep_checkpoints=1,
    max_consecutive_skips=1,
    progress=False,
    tensorboard=False,
)

TRAIN_RULES = {
    "log_every": checks.integer(1),
    "eval_every": checks.integer(0),
    "save_every": checks.integer(1),
    "keep_checkpoints": checks.integer(1),  # 0 would delete every checkpoint, and with them the resume point
    "max_consecutive_skips": checks.integer(1),
    "progress": checks.boolean,
    "tensorboard": checks.boolean,
}


def resolve_train(t: ml_collections.ConfigDict) -> TrainSpec:
    check_section(t, TRAIN_RULES, "train")
    return TrainSpec(**{f.name: t[f.name] for f in dataclasses.fields(TrainSpec)})


def resolve_sampling(section: ml_collections.ConfigDict, key: str) -> SamplingParams:
    with errors_under(key):
        sp = SamplingParams.from_config(section)
        sp.validate()
    return sp


EVAL_RULES = {"num_examples": checks.integer(1), "batch_size": checks.integer(1), "save_completions": checks.boolean}


def resolve_eval(e: ml_collections.ConfigDict) -> EvalSpec:
    check_section(e, EVAL_RULES, "eval")
    sources = check_sources(e.sources, "eval.sources")
    return EvalSpec(
        sources=sources,
        num_examples=int(e.num_examples),
        batch_size=int(e.batch_size),
        sampling=resolve_sampling(e.sampling, "eval.sampling"),
        save_completions=bool(e.save_completions),
    )


def check_sources(entries, key: str, *, required: bool = True) -> tuple[dict, ...]:
    """Data source entries (`jaxvlm.data.sources`), each checked (kind, keys, values, files) without reading data."""
    from jaxvlm.data import sources

    if required and not entries:
        raise config_error(key, "empty: this needs data")
    checked = []
    for k, entry in enumerate(entries or ()):
        if not isinstance(entry, (dict, ml_collections.ConfigDict)):
            raise config_error(f"{key}[{k}]", f"must be a source entry (a dict with a 'kind'), got {entry!r}")
        entry = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
        with errors_under(f"{key}[{k}]"):
            sources.check_entry(entry)
        checked.append(entry)
    return tuple(checked)


# ----------------------------------------------------------------------------------------------------------
# Helpers for recipe files
# ----------------------------------------------------------------------------------------------------------


def check_variant(arg: str | None, variants: tuple[str, ...], config_file: str) -> str:
    """The variant named by `--config <file>:<arg>` ("" for none); ValueError listing the variants otherwise."""
    variant = "" if arg is None else str(arg)
    if variant not in variants:
        raise ValueError(
            f"{config_file}: unknown variant {variant!r}; variants: "
            f"{', '.join(repr(v) for v in variants)} ('' = the paper's / full-size defaults)"
        )
    return variant


def use_tiny_model(
    c: ml_collections.ConfigDict, eval_tasks, *, max_new_tokens: int = 32, eval_examples: int = 16
) -> None:
    """The `:tiny` runtime: the tiny random-weight preset with the built-in tokenizer, one device, a short greedy
    eval on the gym's validation split of `eval_tasks`, frequent checkpoints. The pixel bounds (56 x 56 to 64 x 64)
    give the gym's 56 px images 2 x 2 image tokens in both families: Qwen2.5-VL (resize factor 28) keeps 56 px,
    Qwen3-VL (factor 32, `--config.model.preset=qwen3_vl_tiny`) resizes them to 64 px."""
    c.model.update(
        preset="tiny", path="", dtype="float32", param_dtype="float32", min_pixels=56 * 56, max_pixels=64 * 64
    )
    c.mesh.shape = (1, 1, 1)
    c.train.update(save_every=2, keep_checkpoints=1)
    c.eval.update(
        sources=[gym_source("validation", eval_examples, tasks=tuple(eval_tasks))], num_examples=8, batch_size=8
    )
    c.eval.sampling.max_new_tokens = max_new_tokens
