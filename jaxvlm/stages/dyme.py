"""dyme: DyME's per-prompt switch (`train_steps.dyme_step`). G rollouts per prompt; a prompt none of whose
rollouts is correct is memorised (SFT on its reference completion), some correct -> GRPO, all correct -> skipped.
The references are tokenized at the rollouts' width (`sampling.max_new_tokens`)."""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxvlm import rollouts, train_steps
from jaxvlm.configuration import StageSpec, config_error
from jaxvlm.stages import base
from jaxvlm.stages.grpo import POLICY_LOSS_FIELDS, resolve_rl, rl_defaults

DYME_LOSS_FIELDS = ("dyme_granularity", "dyme_sft_threshold", "dyme_correct_threshold")


class Dyme(base.StageMode):
    name = "dyme"
    step = staticmethod(train_steps.dyme_step)

    def defaults(self) -> ml_collections.ConfigDict:
        return rl_defaults(self.name, POLICY_LOSS_FIELDS + DYME_LOSS_FIELDS)  # beta stays 0 (the authors assert it)

    def resolve(self, section, name: str, seed: int) -> StageSpec:
        spec = resolve_rl(
            self.name,
            section,
            name,
            seed,
            with_targets=True,
            max_target_length=int(section.sampling.max_new_tokens),
            accuracy_required=True,
        )
        if spec.loss.beta > 0:
            raise config_error(
                f"stages.{name}.loss.beta", "DyME trains without a KL term (the authors assert beta == 0)"
            )
        return spec

    def leading(self, spec: StageSpec) -> tuple[int, ...]:
        return (spec.mini_batches, spec.micro_batches)

    def updates_per_step(self, spec: StageSpec) -> int:
        return spec.mini_batches * spec.loss.num_iterations

    def update_batch(
        self, rt, plan: base.StagePlan, params, batch: dict, key, draw: base.Draw
    ) -> tuple[dict, dict[str, float]]:
        del draw  # one batch per step: the switch needs the all-right / all-wrong groups dynamic sampling drops
        spec = plan.spec
        g = spec.sampling.num_generations
        out, metrics = rollouts.rollout(rt, spec, params, batch, key)
        rows = dict(out.rows)
        rows["rewards"] = base.as_float32(out.scores.total)
        rows["accuracy"] = base.as_float32(out.accuracy)
        rows["reference_ids"] = np.repeat(batch["targets"]["completion_ids"], g, axis=0)
        rows["reference_mask"] = np.repeat(batch["targets"]["completion_mask"], g, axis=0)
        return base.microbatches(rt, rows, plan.leading, base.row_pixels(batch, g)), metrics


MODE = Dyme()
