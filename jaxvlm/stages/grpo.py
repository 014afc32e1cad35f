"""grpo: G rollouts per prompt, rule rewards, group advantages, the policy loss (`train_steps.grpo_step`: the
clipped surrogate, CISPO or SAPO by `loss.surrogate`). With `dynamic_sampling.enabled`, DAPO's dynamic sampling
(`jaxvlm.dynamic_sampling`): groups whose rewards all agree are dropped and more batches are sampled to fill the
step's batch."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from jaxvlm import checks, dynamic_sampling, rollouts, sharding, train_steps
from jaxvlm.configuration import StageSpec, check_section, config_error, resolve_sampling
from jaxvlm.stages import base

# The LossConfig fields an RL stage reads; temperature and group_size are derived from its sampling section.
POLICY_LOSS_FIELDS = (
    "surrogate",
    "eps_low",
    "eps_high",
    "delta",
    "importance",
    "beta",
    "kl_estimator",
    "aggregation",
    "cispo_eps_max",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "num_iterations",
    "advantage_scale",
    "old_logp",
    "sampler_correction",
    "sampler_correction_min",
    "sampler_correction_max",
)
DERIVED_LOSS_FIELDS = ("temperature", "group_size")


def rl_defaults(mode: str, loss_fields: tuple[str, ...]) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.mode = mode
    s.steps = 10  # rollout batches; each is K x μ optimizer updates
    s.epochs = 0
    s.data = base.data_section(targets=False)
    s.rewards = []
    s.accuracy_reward = "accuracy"  # the reward (display name) used as correctness: metrics, eval, DyME's switch
    s.optimizer = base.optimizer_section()
    s.loss = base.loss_section(loss_fields, DERIVED_LOSS_FIELDS)
    s.sampling = base.rl_sampling_section()
    s.batch = ml_collections.ConfigDict(dict(micro_batches=1, mini_batches=1))
    return s


def resolve_rl(
    mode: str,
    section,
    name: str,
    seed: int,
    *,
    with_targets: bool = False,
    max_target_length: int | None = None,
    accuracy_required: bool = False,
) -> StageSpec:
    """The spec of an RL stage (grpo, dyme): rewards, sampling, the loss with its derived temperature and group
    size, and rollout rows that cut into K mini-batches x M micro-batches."""
    key = f"stages.{name}"
    steps, epochs = base.check_steps(section, key)
    sampling = resolve_sampling(section.sampling, f"{key}.sampling")
    sources, data = base.resolve_data(
        section, key, seed, with_targets=with_targets, epochs=epochs, max_target_length=max_target_length
    )
    specs = base.resolve_rewards(section, key)
    g = sampling.num_generations
    if g < 2:
        raise config_error(f"{key}.sampling.num_generations", "group advantages need >= 2 rollouts per prompt")
    temperature = (
        float(sampling.temperature) or 1.0,
        f"{key}.sampling.temperature",
        "; greedy sampling, 0, scores at 1.0",
    )
    loss = base.resolve_loss(
        section, key, {"temperature": temperature, "group_size": (g, f"{key}.sampling.num_generations", "")}
    )
    m, k = rollout_batches(section, key, data.batch_size * g)
    optimizer, total = base.resolve_optimizer(section, key)
    return StageSpec(
        name=name,
        mode=mode,
        steps=steps,
        epochs=epochs,
        sources=sources,
        data=data,
        optimizer=optimizer,
        total_steps=total,
        loss=loss,
        micro_batches=m,
        mini_batches=k,
        sampling=sampling,
        rewards=specs,
        accuracy_reward=base.resolve_accuracy_reward(section, key, specs, accuracy_required),
    )


def rollout_batches(section, key: str, rows: int) -> tuple[int, int]:
    """(M micro-batches, K mini-batches) of an RL stage, checked against its rollout rows."""
    rules = {"micro_batches": checks.integer(1), "mini_batches": checks.integer(1)}
    check_section(section.batch, rules, f"{key}.batch")
    m, k = int(section.batch.micro_batches), int(section.batch.mini_batches)
    if rows % (m * k):
        raise config_error(
            f"{key}.batch",
            f"{rows} rollout rows (batch_size x num_generations) cannot be cut into "
            f"{k} mini-batches x {m} micro-batches",
        )
    return m, k


class Grpo(base.StageMode):
    name = "grpo"
    step = staticmethod(train_steps.grpo_step)

    def defaults(self) -> ml_collections.ConfigDict:
        s = rl_defaults(self.name, POLICY_LOSS_FIELDS)
        s.dynamic_sampling = dynamic_sampling.section()  # not DyME's: its switch needs the all-right/all-wrong groups
        return s

    def resolve(self, section, name: str, seed: int) -> StageSpec:
        spec = resolve_rl(self.name, section, name, seed)
        key = f"stages.{name}.dynamic_sampling"
        ds = dynamic_sampling.resolve(section.dynamic_sampling, key)
        if ds.filter == "accuracy" and not spec.accuracy_reward:
            raise config_error(
                f"{key}.filter",
                f"'accuracy' keeps the groups whose accuracy rewards differ, and config.stages.{name}.accuracy_reward "
                "is '' (none); name the accuracy reward or filter on 'reward'",
            )
        return dataclasses.replace(spec, dynamic_sampling=ds)

    def leading(self, spec: StageSpec) -> tuple[int, ...]:
        return (spec.mini_batches, spec.micro_batches)

    def updates_per_step(self, spec: StageSpec) -> int:
        return spec.mini_batches * spec.loss.num_iterations

    def update_batch(
        self, rt, plan: base.StagePlan, params, batch: dict, key, draw: base.Draw
    ) -> tuple[dict, dict[str, float]]:
        """Rollouts of `batch` (with dynamic sampling: of as many batches from `draw` as it takes) -> the update's
        micro-batches; rollout metrics (reward, accuracy, lengths, ...) are over every rollout sampled this step."""
        spec = plan.spec
        g = spec.sampling.num_generations
        if spec.dynamic_sampling.enabled:
            update_rows, totals, pixels, metrics = dynamic_rollouts(rt, spec, params, batch, key, draw)
        else:
            out, metrics = rollouts.rollout(rt, spec, params, batch, key)
            update_rows, totals, pixels = out.rows, out.scores.total, base.row_pixels(batch, g)
        rows, mb = rollouts.grpo_update_batch(
            update_rows,
            totals,
            g,
            spec.loss.advantage_scale,
            plan.leading,
            row_pixels=pixels,
            vision_config=rt.model_config.vision,
            slot_multiple=sharding.data_parallel_size(rt.mesh),
        )
        metrics["advantage_abs_max"] = float(np.max(np.abs(rows["advantages"])))
        return mb, metrics


def dynamic_rollouts(rt, spec: StageSpec, params, batch: dict, key, draw: base.Draw):
    """DAPO's dynamic sampling for one step (`jaxvlm.dynamic_sampling`): sample `batch`, then batches from `draw`,
    until `batch_size` groups have rewards (or accuracies: `filter`) that differ or `max_rounds` batches were
    sampled. Round r > 0 samples with `fold_in(key, r)` (round 0 with `key`, as without dynamic sampling). Returns the
    chosen groups' update rows [R, ...], total rewards [R] and row pixels, and the metrics: the rollout metrics over
    every sampled rollout, the `dynamic_sampling/` counts, and `dynamic_sampling/batch_reward` (mean total reward of
    the update batch)."""
    ds, g, size = spec.dynamic_sampling, spec.sampling.num_generations, spec.data.batch_size

    def sample(data: dict, r: int):
        return rollouts.rollout(rt, spec, params, data, key if r == 0 else jax.random.fold_in(key, r))

    rounds, exhausted = dynamic_sampling.sample_rounds(
        batch, draw, sample, batch_size=size, group_size=g, max_rounds=ds.max_rounds, filter=ds.filter
    )
    selection = dynamic_sampling.select_groups(np.concatenate([r.signal for r in rounds]), size, len(rounds))
    dynamic_sampling.check_short(selection, ds, f"{spec.key}.dynamic_sampling", size, exhausted)
    sampled = dynamic_sampling.concat_rollouts([r.out for r in rounds], rt.tokenizer.pad_token_id)
    metrics = rollouts.rollout_metrics(sampled, g)
    metrics["time/rollout_s"] = sum(r.metrics["time/rollout_s"] for r in rounds)
    metrics.update(selection.metrics())
    index = dynamic_sampling.group_rows(selection.groups, g)
    totals = sampled.scores.total[index]
    metrics[dynamic_sampling.PREFIX + "batch_reward"] = float(np.mean(totals))
    pixels = dynamic_sampling.concat_pixels(
        [base.row_pixels(r.batch, g) for r in rounds], [len(r.out.completions) for r in rounds]
    )
    pixels = None if pixels is None else [pixels[i] for i in index]
    return dynamic_sampling.take_rows(sampled.rows, index), totals, pixels, metrics


MODE = Grpo()
