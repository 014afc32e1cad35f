"""What every stage mode shares: the `StageMode` interface the loop calls, the config sections modes are built
from, their start-up resolution into a `StageSpec`, and the `StagePlan` of a stage about to run.

A mode (one module each: sft, grpo, dyme, rejection_sft, eval) says which keys its stage has (`defaults`), checks
them and resolves them into a `StageSpec` (`resolve`, at start-up), and builds each step's update batch from a data
batch (`update_batch`, the mode's part of the loop body). The loop (`jaxvlm.trainer`) does the rest: state,
reference log-probs, the jitted step, metrics, evaluation, checkpoints.

A mode that needs more data than the step's batch (grpo's dynamic sampling) calls `draw()`, passed to
`update_batch`: the next batch of the stage's own data iterator, or None when finite data has run out. The loop
counts its skipped records with the step's, and the iterator state checkpointed after the step covers every draw,
so a resumed run continues where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from jaxvlm import batching, checks, rewards, sharding
from jaxvlm.configuration import (
    ConfigError,
    StageSpec,
    check_section,
    check_sources,
    config_error,
    errors_under,
    sampling_section,
    typed_none,
)
from jaxvlm.data import sources
from jaxvlm.data.pipeline import PipelineConfig
from jaxvlm.train_steps import OPTIMIZER_RULES, LossConfig, OptimizerConfig

# The next batch of the stage's data iterator (its skipped records counted by the loop), None when data ran out.
Draw = Callable[[], "dict | None"]

# PipelineConfig fields a stage's `data` section does not hold: the run sets them (every process reads the global
# batch; targets follow the mode; the pass count is the stage's `epochs`; rejection sampling keeps images).
RUN_SET_DATA_FIELDS = ("with_targets", "num_epochs", "shard_by_process", "keep_images")


class StageMode:
    """One stage mode. Subclasses set `name`, `step` (a `jaxvlm.train_steps` step) and implement `defaults`,
    `resolve` and `update_batch`; `trains = False` marks a mode without updates (eval)."""

    name: str = ""
    trains: bool = True
    step = None

    def defaults(self) -> ml_collections.ConfigDict:
        """The stage section: every key this mode reads, at its default (and nothing it would ignore)."""
        raise NotImplementedError

    def resolve(self, section: ml_collections.ConfigDict, name: str, seed: int) -> StageSpec:
        """Check the section (ConfigError naming the key) and turn it into the stage's spec."""
        raise NotImplementedError

    def leading(self, spec: StageSpec) -> tuple[int, ...]:
        """Leading dims of the step's batch: (M,) micro-batches, or (K, M) mini x micro for RL."""
        return (spec.micro_batches,)

    def updates_per_step(self, spec: StageSpec) -> int:
        """Optimizer updates per loop step (the learning-rate schedule's unit)."""
        return 1

    def prepare(self, rt, spec: StageSpec, params) -> StageSpec:
        """Work before the stage's data is opened (rejection sampling); returns the spec to run."""
        del rt, params
        return spec

    def update_batch(self, rt, plan: StagePlan, params, batch: dict, key, draw: Draw) -> tuple[dict, dict[str, float]]:
        """A data batch -> the step's `[*leading, b, ...]` micro-batches and host-side metrics. `draw()`: more batches
        of the stage's data, for a mode that needs them (module docstring); the others ignore it."""
        raise NotImplementedError

    def run(self, rt, spec: StageSpec, params, global_step: int) -> dict[str, float]:
        """A mode without updates (`trains = False`) runs here instead of the training loop; returns its metrics."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


def data_section(*, targets: bool, **overrides) -> ml_collections.ConfigDict:
    """A stage's `data`: the data sources and the PipelineConfig fields the stage reads (`max_target_length` only
    where the stage tokenizes reference completions)."""
    skip = set(RUN_SET_DATA_FIELDS) | {"batch_size"} | (set() if targets else {"max_target_length"})
    fields = {f.name: f.default for f in dataclasses.fields(PipelineConfig) if f.name not in skip}
    fields.update(sources=[], batch_size=8)
    d = ml_collections.ConfigDict(fields)
    d.update(overrides)
    return d


def optimizer_section() -> ml_collections.ConfigDict:
    """AdamW + schedule (OptimizerConfig). `total_steps` (the cosine's length) is derived from the stage length;
    setting it is allowed only to the same value."""
    values = {f.name: f.default for f in dataclasses.fields(OptimizerConfig) if f.name != "total_steps"}
    d = ml_collections.ConfigDict(values)
    d.max_grad_norm = ml_collections.FieldReference(values["max_grad_norm"], field_type=float)
    d.total_steps = typed_none(int)
    return d


def loss_section(fields: tuple[str, ...], derived: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The LossConfig `fields` a mode reads, at their defaults; `derived` ones are None (see `resolve_loss`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    d = ml_collections.ConfigDict({k: defaults[k] for k in fields})
    if "delta" in fields:
        d.delta = typed_none(float)
    for k in derived:
        d[k] = typed_none(type(defaults[k]))
    return d


def rl_sampling_section(**values) -> ml_collections.ConfigDict:
    return sampling_section(**{"num_generations": 4, **values})


# ----------------------------------------------------------------------------------------------------------
# Resolution helpers
# ----------------------------------------------------------------------------------------------------------


def check_steps(section, key: str) -> tuple[int, int]:
    check_section(section, {"steps": checks.integer(0), "epochs": checks.integer(0)}, key)
    steps, epochs = int(section.steps), int(section.epochs)
    if steps == 0 and epochs == 0:
        raise config_error(
            f"{key}.steps",
            "give a positive number of steps, or steps=0 and epochs > 0 (with both, "
            "the stage ends at whichever comes first)",
        )
    return steps, epochs


def resolve_data(
    section, key: str, seed: int, *, with_targets: bool, epochs: int = 0, max_target_length: int | None = None
) -> tuple[tuple[dict, ...], PipelineConfig]:
    """The stage's sources and PipelineConfig (run-set fields filled in; `data.seed` offset by `config.seed`)."""
    entries = check_sources(section.data.sources, f"{key}.data.sources")
    values = {k: v for k, v in section.data.to_dict().items() if k != "sources"}
    if "seed" in values:
        check_section(values, {"seed": checks.integer(0)}, f"{key}.data")
    values.update(
        with_targets=with_targets, num_epochs=epochs or None, shard_by_process=False, seed=values.get("seed", 0) + seed
    )
    if max_target_length is not None:
        values["max_target_length"] = max_target_length
    with errors_under(f"{key}.data"):
        data = PipelineConfig.from_dict(values)
    return entries, data


def resolve_optimizer(section, key: str) -> tuple[OptimizerConfig, int | None]:
    values = section.optimizer.to_dict()
    total = values.pop("total_steps")
    if total is not None:
        check_section({"total_steps": total}, {"total_steps": checks.integer(1)}, f"{key}.optimizer")
    with errors_under(f"{key}.optimizer"):
        checks.check_fields(values, {k: OPTIMIZER_RULES[k] for k in ("frozen", "no_decay")})
        values.update(frozen=tuple(values["frozen"]), no_decay=tuple(values["no_decay"]), total_steps=1)
        cfg = OptimizerConfig(**values)
        cfg.validate()
    return cfg, total


def resolve_loss(section, key: str, derived: dict[str, tuple[Any, str, str]] | None = None) -> LossConfig:
    """LossConfig from the section's `loss` keys plus the derived values {field: (value, source key, how)}: a
    derived key left unset takes its value; set to another value it is a ConfigError naming both keys."""
    values = section.loss.to_dict()
    for field, (value, source, how) in (derived or {}).items():
        given = values.get(field)
        if given is not None and given != value:
            raise config_error(
                f"{key}.loss.{field}",
                f"is derived from config.{source} (= {value!r}{how}); got "
                f"{given!r}. Set config.{source} instead, or leave config.{key}.loss.{field} unset",
            )
        values[field] = value
    with errors_under(f"{key}.loss"):
        cfg = LossConfig(**values)
        cfg.validate()
    return cfg


def resolve_rewards(section, key: str) -> tuple:
    """The stage's RewardSpecs; a `max_completion_len` (soft_overlong) defaults to `sampling.max_new_tokens`."""
    if not section.rewards:
        raise config_error(f"{key}.rewards", f"a {section.mode} stage needs rewards")
    max_new_tokens = section.sampling.max_new_tokens  # a bad value is the sampling section's error, reported there
    try:
        return rewards.parse_reward_specs(
            list(section.rewards), max_new_tokens=max_new_tokens if checks.integer(1)(max_new_tokens) is None else None
        )
    except (ValueError, KeyError) as error:
        raise config_error(f"{key}.rewards", str(error)) from None


def resolve_accuracy_reward(section, key: str, specs: tuple, required: bool = False) -> str:
    """The stage's correctness reward (its display name), which must be one of its rewards; "" (unless `required`):
    none of them (a format-only stage: its evaluation scores with the prompt style's accuracy)."""
    names = rewards.display_names(specs)
    if section.accuracy_reward == "" and not required:
        return ""
    if section.accuracy_reward not in names:
        raise config_error(
            f"{key}.accuracy_reward",
            f"{section.accuracy_reward!r} is not one of the stage's rewards "
            f"{names}" + ("" if required else " ('' for none)"),
        )
    return section.accuracy_reward


def check_micro_batches(micro_batches: int, rows: int, key: str, what: str) -> None:
    check_section({"micro_batches": micro_batches}, {"micro_batches": checks.integer(1)}, f"{key}.batch")
    if rows % micro_batches:
        raise config_error(f"{key}.batch.micro_batches", f"{micro_batches} does not divide {what}")


# ----------------------------------------------------------------------------------------------------------
# The plan of a stage about to run
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage about to run: its spec, its length in loop steps, the step batch's leading dims, and the optimizer
    config with the schedule's length filled in."""

    spec: StageSpec
    steps: int
    leading: tuple[int, ...]
    optimizer: OptimizerConfig

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def loss(self) -> LossConfig:
        return self.spec.loss

    def data(self) -> dict:
        """The `sources.input_pipeline` section: sources + PipelineConfig fields."""
        return {"sources": [dict(e) for e in self.spec.sources], **dataclasses.asdict(self.spec.data)}


def stage_steps(spec: StageSpec) -> int:
    """Loop steps of a stage: `steps`, or with steps = 0, `epochs` passes over its first source's share."""
    if spec.steps:
        return spec.steps
    first = sources.make_source(dict(spec.sources[0]), f"{spec.key}.data.sources[0]")
    share = 1.0
    if len(spec.sources) > 1:
        weights = sources.source_weights(list(spec.sources))
        share = weights[0] / sum(weights)
    return max(1, int(spec.epochs * len(first) / share) // spec.data.batch_size)


def plan(mode: StageMode, spec: StageSpec) -> StagePlan:
    steps = stage_steps(spec)
    total = steps * mode.updates_per_step(spec)
    if spec.total_steps is not None and spec.total_steps != total:
        raise ConfigError(
            f"config.{spec.key}.optimizer.total_steps: is derived from config.{spec.key}.steps / epochs (= {total} "
            f"updates: {steps} steps x {mode.updates_per_step(spec)} updates per step); got {spec.total_steps}. "
            f"Leave it unset"
        )
    return StagePlan(spec, steps, mode.leading(spec), dataclasses.replace(spec.optimizer, total_steps=total))


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def row_pixels(batch: dict, repeat: int = 1):
    """Each row's images (repeated for its `repeat` rollout rows), or None for a text-only batch."""
    if "pixel_values" not in batch["prompts"]:
        return None
    per_row = batching.pixels_per_row(batch["prompts"], [ex["num_images"] for ex in batch["examples"]])
    return batching.repeat_rows(per_row, repeat) if repeat > 1 else per_row


def microbatches(rt, rows: dict, leading: tuple[int, ...], pixels) -> dict:
    """Rows `[R, ...]` as the step's `[*leading, b, ...]` micro-batches, image slots split over the mesh."""
    return batching.microbatches(
        rows,
        leading,
        row_pixels=pixels,
        vision_config=rt.model_config.vision,
        slot_multiple=sharding.data_parallel_size(rt.mesh),
    )


def as_float32(x) -> np.ndarray:
    return np.asarray(x, np.float32)
