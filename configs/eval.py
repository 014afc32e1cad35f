"""Evaluate a checkpoint on a held-out set: `python -m jaxvlm.evaluate --config configs/eval.py[:variant] ...`.

Variants:
  ""      a JSONL set (MathVista-style: question, answer, answer_type, images), greedy, in the r1 prompt format:
              python -m jaxvlm.evaluate --config configs/eval.py --workdir /tmp/eval \\
                  --config.model.path=/path/to/checkpoint \\
                  --config.stages.eval.data.sources[0].path=/data/test.jsonl
  "gym"   the built-in gym's test split (every task), greedy, in the dyme prompt format (the demo's):
              python -m jaxvlm.evaluate --config configs/eval.py:gym --config.model.path=/tmp/jaxvlm-demo/final_model \\
                  --workdir /tmp/eval
  "tiny"  the gym's validation split on the tiny random-weight preset, 4 samples per example (pass@4): a smoke test
          of the command on a CPU, no checkpoint needed.

Options worth knowing: `stages.eval.sampling.{num_generations, temperature}` (k samples each: accuracy is the mean
over samples and pass@k the share of examples with a correct one), `stages.eval.num_examples` (0 = all),
`stages.eval.data.on_error="skip"` (bad records skipped and counted instead of stopping), `stages.eval.rewards`
(further rewards to report; `accuracy_reward` names the one that scores), `mesh.shape` (rows split over devices).
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import check_variant, evaluation_config, gym_source, stage

VARIANTS = ("", "gym", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/eval.py")
    c = evaluation_config()
    c.model.update(dtype="bfloat16", param_dtype="bfloat16", max_pixels=401408)
    c.stage_order = ("eval",)
    c.stages.eval = stage(
        "eval",
        data=dict(
            sources=[
                {
                    "kind": "jsonl",
                    "path": "/path/to/test.jsonl",
                    "record_format": "jaxvlm",
                    "answer_type": "string",
                    "image_root": "",
                }
            ],
            batch_size=16,
            prompt_style="r1",
            max_prompt_length=2048,
        ),
        sampling=dict(num_generations=1, max_new_tokens=1024, temperature=0.0),
    )
    if variant == "gym":
        c.model.update(dtype="float32", param_dtype="float32", max_pixels=56 * 56)
        c.stages.eval.data.update(
            sources=[gym_source("test", 256)],
            prompt_style="dyme",
            with_caption=False,
            max_prompt_length=256,
            batch_size=32,
        )
        c.stages.eval.sampling.max_new_tokens = 96
    elif variant == "tiny":
        c.model.update(preset="tiny", dtype="float32", param_dtype="float32", max_pixels=56 * 56)
        c.mesh.shape = (1, 1, 1)
        c.stages.eval.data.update(
            sources=[gym_source("validation", 8, tasks=("exists", "count"))],
            batch_size=4,
            prompt_style="r1",
            max_prompt_length=256,
        )
        c.stages.eval.sampling.update(num_generations=4, temperature=1.0, max_new_tokens=16)
    return c
