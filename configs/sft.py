"""Plain supervised fine-tuning on reference chains of thought: the "+SFT" baseline of the seed papers.

One stage, mode "sft": token-mean cross-entropy on the reference completion (r1 style:
`<think>{reasoning}</think>\\n<answer>{answer}</answer>` + end-of-turn) after the chat-template prompt; the prompt
tokens are not trained. Its final weights (`<workdir>/final_model`) can start an RL recipe, e.g. DyME's "two-stage"
setting (`configs/dyme.py` with `--config.model.path=<workdir>/final_model`).

Hyperparameters: DyME's SFT baseline (`sft_args` in DyME's configs; docs/methods.md §7): lr 1e-5, weight decay 0.01,
no warmup, grad clip 1.0, per-device 2 x grad-acc 4 x 8 GPUs = 64 examples per step, 10 epochs, max_length 4096,
vision tower frozen (DyME fine-tunes its full-size models with the vision tower frozen; Curr-ReFT's SFT baseline
also sets freeze_vit). Prompt style r1 (the R1-V lineage: Curr-ReFT, CLGRPO, Infi-MMR); for DyME's baseline use
`--config.stages.sft.data.prompt_style=dyme`.

Variants (`--config configs/sft.py:<variant>`):

  ""    a real model and a JSONL with `reasoning` (or DyME's `hint`) per record; replace the /path/to/...
        placeholder:
            python -m jaxvlm.main --config configs/sft.py --workdir /tmp/sft \\
              --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct \\
              --config.stages.sft.data.sources[0].path=/data/train.jsonl --config.eval.sources[0].path=/data/test.jsonl
  "tiny" the gym's reference reasoning on every task with the tiny random-weight model, on a CPU:
            python -m jaxvlm.main --config configs/sft.py:tiny --workdir /tmp/sft
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import base_config, check_variant, gym_source, stage, use_tiny_model
from jaxvlm.data.gym import TASKS

VARIANTS = ("", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/sft.py")
    c = base_config()
    # The paper's sizes need a real checkpoint: --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct (no preset, so
    # forgetting the path stops the run at start-up instead of training a random tiny model on real data).
    c.model.preset = ""
    c.stage_order = ("sft",)
    c.stages.sft = stage(
        "sft",
        steps=0,
        epochs=10,  # DyME sft_args: 10 epochs
        data=dict(
            sources=[
                {
                    "kind": "jsonl",
                    "path": "/path/to/train_with_reasoning.jsonl",
                    "record_format": "jaxvlm",
                    "answer_type": "string",
                    "image_root": "",
                }
            ],  # placeholder
            batch_size=64,  # DyME sft_args: 2 x 4 x 8 GPUs
            prompt_style="r1",
            # DyME sft_args: max_length 4096 (prompt + target); split here as 2048 + 2048.
            max_prompt_length=2048,
            max_target_length=2048,
        ),
        optimizer=dict(
            learning_rate=1e-5,
            weight_decay=0.01,
            warmup_steps=0,
            max_grad_norm=1.0,  # DyME sft_args
            # Departure: the HF Trainer's default schedule is linear decay to 0; cosine to 0 is the closest.
            schedule="cosine",
            final_lr_ratio=0.0,
            frozen=("^visual/",),  # vision tower frozen (see the module docstring)
        ),
        loss=dict(sft_aggregation="token"),  # HF: mean over all target tokens of the batch
        batch=dict(micro_batches=8),  # 8 examples per micro-batch (memory only)
    )
    c.model.update(dtype="bfloat16", param_dtype="float32", min_pixels=56 * 56, max_pixels=401408)  # bf16 training
    c.eval.update(
        sources=[
            {
                "kind": "jsonl",
                "path": "/path/to/test.jsonl",
                "record_format": "jaxvlm",
                "answer_type": "string",
                "image_root": "",
            }
        ],
        num_examples=512,
        batch_size=32,
    )
    c.eval.sampling.max_new_tokens = 1024
    c.train.update(save_every=500, eval_every=0)

    if variant == "tiny":
        use_tiny_model(c, TASKS, max_new_tokens=48)
        s = c.stages.sft
        s.steps, s.epochs = 4, 0
        s.data.update(
            sources=[gym_source("train", 64, tasks=TASKS)],  # every task, text-only word_arithmetic included
            batch_size=4,
            max_prompt_length=192,  # r1 gym prompts with a 56 px image: <= 105 tokens
            max_target_length=160,  # r1 gym targets + end-of-turn: <= ~145 tokens (grounding's are the longest)
            on_error="skip",  # a too-long record is dropped and counted instead of stopping the run
        )
        s.batch.micro_batches = 2
        s.optimizer.learning_rate = 3e-3  # tiny: a random-weight toy model; 1e-5 would not move it in a demo run
    return c
