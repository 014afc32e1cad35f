"""sft: supervised fine-tuning on the data's reference completions (the token NLL of `train_steps.sft_step`)."""

from __future__ import annotations

import ml_collections

from jaxvlm import train_steps
from jaxvlm.configuration import StageSpec
from jaxvlm.data import pipeline
from jaxvlm.stages import base


class Sft(base.StageMode):
    name = "sft"
    step = staticmethod(train_steps.sft_step)

    def defaults(self) -> ml_collections.ConfigDict:
        s = ml_collections.ConfigDict()
        s.mode = self.name
        s.steps = 10  # optimizer steps; 0: from epochs
        s.epochs = 0  # passes over the (first) data source; with steps > 0 a bound too (0: none)
        s.data = base.data_section(targets=True)
        s.optimizer = base.optimizer_section()
        s.loss = base.loss_section(("sft_aggregation",))
        s.batch = ml_collections.ConfigDict(dict(micro_batches=1))  # gradient accumulation
        return s

    def resolve(self, section, name: str, seed: int) -> StageSpec:
        key = f"stages.{name}"
        steps, epochs = base.check_steps(section, key)
        sources, data = base.resolve_data(section, key, seed, with_targets=True, epochs=epochs)
        base.check_micro_batches(
            section.batch.micro_batches, data.batch_size, key, f"data.batch_size={data.batch_size}"
        )
        optimizer, total = base.resolve_optimizer(section, key)
        return StageSpec(
            name=name,
            mode=self.name,
            steps=steps,
            epochs=epochs,
            sources=sources,
            data=data,
            optimizer=optimizer,
            total_steps=total,
            loss=base.resolve_loss(section, key),
            micro_batches=int(section.batch.micro_batches),
        )

    def update_batch(
        self, rt, plan: base.StagePlan, params, batch: dict, key, draw: base.Draw
    ) -> tuple[dict, dict[str, float]]:
        del params, key, draw
        return base.microbatches(rt, pipeline.sft_batch(batch), plan.leading, base.row_pixels(batch)), {}


MODE = Sft()
