"""eval: a stage without updates. Decode every example of its sources (or `num_examples`) with its sampling settings
(greedy by default; k samples for pass@k), score them with its accuracy reward (and any further `rewards`), and
write `<workdir>/eval/<stage>/completions.jsonl` and `summary.json`. `python -m jaxvlm.evaluate` runs configs made
of such stages; a recipe may end with one."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from jaxvlm import checks, evaluation
from jaxvlm.configuration import StageSpec, check_section, config_error, resolve_sampling, sampling_section
from jaxvlm.stages import base

# The PipelineConfig fields an eval stage's data section holds (no shuffling, no targets, every example once).
EVAL_DATA_FIELDS = (
    "sources",
    "batch_size",
    "prompt_style",
    "with_caption",
    "max_prompt_length",
    "max_image_pixels",
    "prompt_buckets",
    "on_error",
    "num_threads",
    "prefetch",
    "worker_processes",
)


class Eval(base.StageMode):
    name = "eval"
    trains = False

    def defaults(self) -> ml_collections.ConfigDict:
        s = ml_collections.ConfigDict()
        s.mode = self.name
        data = base.data_section(targets=False)
        s.data = ml_collections.ConfigDict({k: data[k] for k in EVAL_DATA_FIELDS})
        s.num_examples = 0  # 0: every example of the sources
        s.sampling = sampling_section(temperature=0.0, max_new_tokens=256)  # greedy; k > 1 samples: pass@k
        s.rewards = []  # [] = accuracy for the prompt style; else every reward is reported, `accuracy_reward` scores
        s.accuracy_reward = "accuracy"
        return s

    def resolve(self, section, name: str, seed: int) -> StageSpec:
        key = f"stages.{name}"
        check_section(section, {"num_examples": checks.integer(0)}, key)  # 0 = all
        sources, data = base.resolve_data(section, key, seed, with_targets=False, epochs=1)
        data = dataclasses.replace(data, shuffle=False, drop_remainder=False)
        sampling = resolve_sampling(section.sampling, f"{key}.sampling")
        specs, accuracy = (), "accuracy"
        if section.rewards:
            specs = base.resolve_rewards(section, key)
            accuracy = base.resolve_accuracy_reward(section, key, specs)
        elif section.accuracy_reward != "accuracy":
            raise config_error(
                f"{key}.accuracy_reward",
                f"{section.accuracy_reward!r} names a reward, but "
                f"config.{key}.rewards is empty (give the rewards, or leave it 'accuracy')",
            )
        return StageSpec(
            name=name,
            mode=self.name,
            steps=0,
            epochs=1,
            sources=sources,
            data=data,
            optimizer=None,
            total_steps=None,
            loss=None,
            sampling=sampling,
            rewards=specs,
            accuracy_reward=accuracy,
            num_examples=int(section.num_examples),
        )

    def run(self, rt, spec: StageSpec, params, global_step: int) -> dict[str, float]:
        """Evaluate `params`; log eval/* at `global_step`; write the completions and the summary."""
        out_dir = os.path.join(rt.workdir, "eval", spec.name)
        metrics = evaluation.evaluate(
            rt, params, evaluation.task_for_eval_stage(spec), os.path.join(out_dir, "completions.jsonl")
        )
        rt.writer.write(global_step, {**metrics, "stage": spec.name}, prefix="eval/")
        if rt.is_main:
            summary = {
                "stage": spec.name,
                "model": rt.model_source,
                "sources": list(spec.sources),
                "num_generations": spec.sampling.num_generations,
                "temperature": spec.sampling.temperature,
                "max_new_tokens": spec.sampling.max_new_tokens,
                "metrics": metrics,
            }
            with open(os.path.join(out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return metrics


MODE = Eval()
