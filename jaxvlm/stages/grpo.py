"""grpo: G rollouts per prompt, rule rewards, group advantages, the policy loss (`train_steps.grpo_step`: the
clipped surrogate, CISPO or SAPO by `loss.surrogate`)."""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxvlm import checks, rollouts, sharding, train_steps
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
        return rl_defaults(self.name, POLICY_LOSS_FIELDS)

    def resolve(self, section, name: str, seed: int) -> StageSpec:
        return resolve_rl(self.name, section, name, seed)

    def leading(self, spec: StageSpec) -> tuple[int, ...]:
        return (spec.mini_batches, spec.micro_batches)

    def updates_per_step(self, spec: StageSpec) -> int:
        return spec.mini_batches * spec.loss.num_iterations

    def update_batch(self, rt, plan: base.StagePlan, params, batch: dict, key) -> tuple[dict, dict[str, float]]:
        spec = plan.spec
        out, metrics = rollouts.rollout(rt, spec, params, batch, key)
        rows, mb = rollouts.grpo_update_batch(
            out.rows,
            out.scores.total,
            spec.sampling.num_generations,
            spec.loss.advantage_scale,
            plan.leading,
            row_pixels=base.row_pixels(batch, spec.sampling.num_generations),
            vision_config=rt.model_config.vision,
            slot_multiple=sharding.data_parallel_size(rt.mesh),
        )
        metrics["advantage_abs_max"] = float(np.max(np.abs(rows["advantages"])))
        return mb, metrics


MODE = Grpo()
