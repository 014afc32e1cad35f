"""Rejection sampling (Curr-ReFT's self-improvement stage): sample, keep each prompt's best completion if it earns
enough reward, and write the kept set as a JSONL dataset for the stage's SFT."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jaxvlm import rollouts
from jaxvlm.configuration import StageSpec
from jaxvlm.data import sources


def rejection_sample(rt, spec: StageSpec, params) -> str:
    """Sample `sampling.num_generations` completions for each of `rejection.num_prompts` prompts of the stage's data,
    keep each prompt's best one if its total reward reaches `rejection.min_reward`, and write the kept set to
    `rejection/<stage>/kept.jsonl` (+ PNGs; `target` = the completion).

    Returns the JSONL path. A finished file (marked by `summary.json`) is reused when a run resumes.
    """
    from jaxvlm.data.export import write_jsonl_dataset

    r = spec.rejection
    out_dir = os.path.join(rt.workdir, "rejection", spec.name)
    path, summary_path = os.path.join(out_dir, "kept.jsonl"), os.path.join(out_dir, "summary.json")
    if os.path.isfile(summary_path):
        return path
    kept, best_rewards, seen = best_samples(rt, spec, params)
    if rt.is_main:
        os.makedirs(out_dir, exist_ok=True)
        write_jsonl_dataset(kept, out_dir, name="kept.jsonl")
        mean_best = float(np.mean(best_rewards)) if best_rewards else None
        summary = {"prompts": seen, "kept": len(kept), "min_reward": r.min_reward, "mean_best_reward": mean_best}
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"rejection {spec.name}")
    if not kept:
        raise ValueError(
            f"stage {spec.name}: rejection sampling kept no sample of {seen} prompts (min_reward="
            f"{r.min_reward}); lower config.{spec.key}.rejection.min_reward or train longer first"
        )
    return path


def best_samples(rt, spec: StageSpec, params) -> tuple[list[dict], list[float], int]:
    """(kept examples with their best completion as `target`, every prompt's best total reward, prompts seen)."""
    r = spec.rejection
    data = dataclasses.replace(
        spec.data, batch_size=r.batch_size, with_targets=False, shuffle=True, num_epochs=1, drop_remainder=True,
        prefetch=0, keep_images=True,
    )  # fmt: skip
    section = {"sources": [dict(e) for e in spec.sources], **dataclasses.asdict(data)}
    iterator = iter(sources.input_pipeline(section, rt.tokenizer, rt.image_processor, rt.model_config))
    n = spec.sampling.num_generations
    kept, best_rewards, seen = [], [], 0
    key = jax.random.key(rt.seed + 7919)
    for step, batch in enumerate(iterator):
        if seen >= r.num_prompts:
            break
        key_step = jax.random.fold_in(key, step)
        out = rollouts.sample_and_score(rt, params, batch, key_step, spec.sampling, spec.rewards, None)
        totals = out.scores.total.reshape(-1, n)
        for b, example in enumerate(batch["examples"]):
            best = int(np.argmax(totals[b]))
            best_rewards.append(float(totals[b, best]))
            if totals[b, best] >= r.min_reward:
                completion = out.completions[b * n + best]
                kept.append({**example, "target": completion.strip(), "id": f"{example['id']}#rejection"})
        seen += len(batch["examples"])
    return kept, best_rewards, seen
