"""rejection_sft: Curr-ReFT's self-improvement stage. Sample `sampling.num_generations` completions for each of
`rejection.num_prompts` prompts of `data` with the stage's starting model, keep each prompt's best one if its total
reward reaches `rejection.min_reward` (`jaxvlm.rejection`), then SFT on the kept set (mixed with text-only sources
at `rejection.text_share`)."""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxvlm import checks, rejection
from jaxvlm.configuration import (
    RejectionSpec,
    StageSpec,
    check_section,
    check_sources,
    config_error,
    resolve_sampling,
)
from jaxvlm.stages import base
from jaxvlm.stages.sft import Sft

REJECTION_RULES = {
    "min_reward": checks.number(),
    "num_prompts": checks.integer(1),
    "batch_size": checks.integer(1),
    "text_share": checks.number(0, 1, hi_open=True),
}


class RejectionSft(Sft):
    name = "rejection_sft"

    def defaults(self) -> ml_collections.ConfigDict:
        s = super().defaults()
        s.mode = self.name
        s.rewards = []
        s.accuracy_reward = "accuracy"  # the correctness reward of the stage's evaluation
        s.sampling = base.rl_sampling_section()
        s.rejection = ml_collections.ConfigDict(
            dict(
                min_reward=1.0,  # a prompt's best sample is kept when its total reward reaches this
                num_prompts=64,
                batch_size=8,  # prompts per sampling batch
                text_share=0.0,  # share of text-only examples (text_sources) mixed into the SFT set
                text_sources=[],
            )
        )
        return s

    def resolve(self, section, name: str, seed: int) -> StageSpec:
        key = f"stages.{name}"
        spec = super().resolve(section, name, seed)
        specs = base.resolve_rewards(section, key)
        r = section.rejection
        check_section(r, REJECTION_RULES, f"{key}.rejection")
        text_sources = check_sources(r.text_sources, f"{key}.rejection.text_sources", required=False)
        if r.text_share > 0 and not r.text_sources:
            raise config_error(f"{key}.rejection.text_sources", "text_share > 0 needs text-only sources")
        if r.text_share == 0 and r.text_sources:
            raise config_error(f"{key}.rejection.text_sources", "given with text_share = 0: they would not be used")
        return dataclasses.replace(
            spec,
            mode=self.name,
            sampling=resolve_sampling(section.sampling, f"{key}.sampling"),
            rewards=specs,
            accuracy_reward=base.resolve_accuracy_reward(section, key, specs),
            rejection=RejectionSpec(
                min_reward=float(r.min_reward),
                num_prompts=int(r.num_prompts),
                batch_size=int(r.batch_size),
                text_share=float(r.text_share),
                text_sources=text_sources,
            ),
        )

    def prepare(self, rt, spec: StageSpec, params) -> StageSpec:
        """Sample and filter (or reuse a finished sampling phase), then train on the kept set."""
        kept = rejection.rejection_sample(rt, spec, params)
        r = spec.rejection
        sources = [{"kind": "jsonl", "path": kept, "weight": 1.0 - r.text_share}]
        if r.text_share > 0:
            sources += [dict(e, weight=r.text_share / len(r.text_sources)) for e in r.text_sources]
        return dataclasses.replace(spec, sources=tuple(sources))


MODE = RejectionSft()
