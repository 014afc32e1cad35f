"""Rollouts for RL stages: sample G completions per prompt, decode and score them on the host, and assemble the
update rows (the sampler's tokens and log-probs, plus advantages or DyME's rewards).

`grpo_update_batch` is the one assembly of a GRPO update batch: the trainer's grpo stage and the benchmark's GRPO
step both call it.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import batching, distributed, losses, rewards, sampling, train_steps
from jaxvlm.sampling import SamplingParams


@dataclasses.dataclass
class Rollouts:
    completions: list[str]
    examples: list[dict]
    scores: rewards.RewardResult
    accuracy: np.ndarray  # [R] the accuracy reward of each row (zeros when the stage names none)
    rows: dict  # prompt_ids, prompt_mask, completion_ids, completion_mask, position_ids, old_logp  [R, ...]
    lengths: np.ndarray  # [R]
    truncated: np.ndarray  # [R]


def sample_and_score(
    rt, params, batch: dict, key, sp: SamplingParams, reward_specs, accuracy_reward: str | None, *, on_mesh: bool = True
) -> Rollouts:
    """`sp.num_generations` rollouts per prompt of a pipeline batch from the sampler (rows sharded over the run's
    mesh; `on_mesh=False` for a batch that does not split over it), decoded and scored on the host."""
    prompts = batch["prompts"]
    g = sp.num_generations
    rollout = sampling.generate(rt.model, params, prompts, key, sp, mesh=rt.mesh if on_mesh else None)
    host = jax.tree.map(distributed.host_value, rollout)
    completions = sampling.decode_completions(rt.tokenizer, host)
    examples = [ex for ex in batch["examples"] for _ in range(g)]
    scores = rewards.compute_rewards(reward_specs, completions, examples, lengths=np.asarray(host.lengths))
    names = list(scores.names)
    accuracy = (
        scores.per_reward[:, names.index(accuracy_reward)]
        if accuracy_reward in names
        else np.zeros(len(completions), np.float32)
    )
    rows = sampling.update_rows(sampling.prepare_prompts(rt.model_config, prompts), host, g)
    return Rollouts(completions, examples, scores, accuracy, rows, host.lengths, host.truncated)


def rollout(rt, spec, params, batch: dict, key) -> tuple[Rollouts, dict[str, float]]:
    """An RL stage's rollouts of one batch, with the rollout metrics (reward, accuracy, lengths, time)."""
    start = time.perf_counter()
    out = sample_and_score(rt, params, batch, key, spec.sampling, spec.rewards, spec.accuracy_reward)
    metrics = rollout_metrics(out, spec.sampling.num_generations)
    metrics["time/rollout_s"] = time.perf_counter() - start
    return out, metrics


def rollout_metrics(out: Rollouts, group_size: int) -> dict[str, float]:
    metrics = dict(out.scores.metrics())
    stats = losses.group_reward_stats(jnp.asarray(out.scores.total), group_size)
    metrics.update(
        reward=float(np.mean(out.scores.total)),
        accuracy=float(np.mean(out.accuracy)),
        completion_length=float(np.mean(out.lengths)),
        truncated_fraction=float(np.mean(out.truncated)),
        frac_reward_zero_std=float(stats["zero_std_fraction"]),
    )
    return metrics


def grpo_update_batch(
    rows: dict,
    rewards_total: np.ndarray,
    group_size: int,
    advantage_scale: str,
    leading: tuple[int, ...],
    *,
    row_pixels,
    vision_config,
    slot_multiple: int,
) -> tuple[dict, dict]:
    """A GRPO update from rollout rows [R, ...] (`sampling.update_rows`) and their total rewards [R]: the rows with
    group advantages, and their `[*leading, b, ...]` micro-batches (each prompt's images shared by its G rows)."""
    rows = dict(rows)
    advantages = losses.group_advantages(jnp.asarray(rewards_total), group_size, scale=advantage_scale)
    rows["advantages"] = np.asarray(advantages, np.float32)
    return rows, batching.microbatches(
        rows, leading, row_pixels=row_pixels, vision_config=vision_config, slot_multiple=slot_multiple
    )


def reference_logprobs_fn(model, num_leading: int, temperature: float):
    """Jitted log π_ref(completion) [*leading, b, N] over micro-batches (lax.map: one micro-batch at a time)."""

    return jax.jit(lambda params, mb: train_steps.rollout_logprobs(model, params, mb, num_leading, temperature))
