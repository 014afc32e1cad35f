"""CLGRPO (arXiv 2506.18048): incremental training of a small VLM on self-built chain-of-thought data.

Spec: docs/methods.md §4. Only the abstract (and a summary of the stage names) was available: no paper
body, code, model or hyperparameters. Everything below that is not one of these four facts is INFERENCE:

  sft       "Domain Knowledge Injection": SFT of the pretrained model on the COT data
  format    "Format Alignment": a small amount of GRPO with format rewards only, on the COT data
  accuracy  "Reasoning Ability Enhancement": GRPO with format and accuracy rewards
  cliplow   "Capture Space Constraint": ClipLow GRPO, "to constrain the capture space"

ClipLow (inference, docs/methods.md §4.3): the PPO clip with an asymmetric, tighter LOWER bound,
ℓ = -min(ρA, clip(ρ, 1 - ε_low, 1 + ε_high)A) with ε_low (0.1) < ε_high (0.2). The lower bound only acts on tokens
with A < 0 and only when the ratio can differ from 1, i.e. with more than one update per rollout batch. So the stage
takes K = 2 mini-batches x μ = 2 passes = 4 updates per rollout batch (only the very first is on-policy). ε_low is the
knob to sweep until the paper is read: `--config.stages.cliplow.loss.eps_low=0.05` (or > 0.2 for the opposite).

Task: EmoSet-118K emotion classification (8 Mikels emotions); the accuracy is an exact match of the label.
Prompt style "r1" (think/answer tags; inference: the COT format is not public).

Variants (`--config configs/clgrpo.py:<variant>`):

  ""    the four stages for a real model (the paper uses a "1B SVLM", probably InternVL-1B: inference; jaxvlm runs
        Qwen2.5-VL). Set the model and replace the /path/to/... placeholders (EmoSet COT JSONL with `reasoning`):
            python -m jaxvlm.main --config configs/clgrpo.py --workdir /tmp/clgrpo \\
              --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct \\
              --config.stages.sft.data.sources[0].path=/data/emoset_cot/train.jsonl  # ... and format, accuracy,
                                                                                     # cliplow, eval.sources[0]
  "tiny" the same four stages on the built-in gym's `mood` task (a one-label classification, the emotion-label
        analogue) plus two other open tasks, with the tiny random-weight model, on a CPU:
            python -m jaxvlm.main --config configs/clgrpo.py:tiny --workdir /tmp/clgrpo
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import base_config, check_variant, gym_source, stage, use_tiny_model

VARIANTS = ("", "tiny")
STAGES = ("sft", "format", "accuracy", "cliplow")
TINY_TASKS = ("mood", "largest_attribute", "count")

# Inference (docs/methods.md §4.2: "presumably <think>...</think><answer>...</answer>"). Departure from R1-V's rule:
# each tag exactly once.
FORMAT_ONLY = ["format_think_answer"]
# Inference: exact match of the emotion label (answer_type "string": case and surrounding punctuation ignored).
FORMAT_ACCURACY = ["format_think_answer", "accuracy"]


def _rl_stage(
    rewards: list,
    *,
    steps: int = 0,
    epochs: int = 0,
    eps_low: float = 0.2,
    num_iterations: int = 1,
    mini_batches: int = 1,
    sources: list,
) -> ml_collections.ConfigDict:
    rows = 16 * 8
    return stage(
        "grpo",
        steps=steps,
        epochs=epochs,
        data=dict(sources=sources, batch_size=16, prompt_style="r1", max_prompt_length=1024),  # inference
        rewards=rewards,
        optimizer=dict(
            # Inference: TRL's GRPO defaults (lr 1e-6, weight decay 0, warmup 0, clip 1.0); cosine (TRL: linear).
            learning_rate=1e-6,
            weight_decay=0.0,
            warmup_steps=0,
            max_grad_norm=1.0,
            schedule="cosine",
            final_lr_ratio=0.0,
            frozen=(),  # inference: whole model, as in the R1-V lineage
        ),
        loss=dict(
            # Inference: k3 KL at 0.04, the TRL default of the R1-V lineage in mid-2025 (today's TRL default is 0).
            beta=0.04,
            kl_estimator="k3",
            eps_low=eps_low,
            eps_high=0.2,  # standard ε = 0.2; only the ClipLow stage lowers ε_low
            num_iterations=num_iterations,
            aggregation="grpo",
            advantage_scale="group",
        ),
        # Inference: TRL defaults G 8, 512 new tokens, temperature 1.0
        sampling=dict(num_generations=8, max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
        # 128 rows in micro-batches of 16 rows (memory only)
        batch=dict(micro_batches=rows // 16 // mini_batches, mini_batches=mini_batches),
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/clgrpo.py")
    c = base_config()
    # The paper's sizes need a real checkpoint: --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct (no preset, so
    # forgetting the path stops the run at start-up instead of training a random tiny model on real data).
    c.model.preset = ""
    c.stage_order = STAGES
    # Placeholder: EmoSet-118K turned into COT data by >= 7B LVLMs (the paper's "Self-Supervised COT Data Construction
    # System"); records {"image", "question", "answer": "<emotion>", "reasoning": "..."}.
    cot = [
        {
            "kind": "jsonl",
            "path": "/path/to/emoset_cot/train.jsonl",
            "record_format": "jaxvlm",
            "answer_type": "string",
            "image_root": "",
        }
    ]
    c.stages.sft = stage(
        "sft",
        steps=0,
        epochs=1,  # inference
        data=dict(
            sources=cot, batch_size=64, prompt_style="r1", max_prompt_length=1024, max_target_length=1024
        ),  # inference
        optimizer=dict(
            # Inference: DyME's SFT baseline settings (lr 1e-5, weight decay 0.01, no warmup, clip 1.0).
            learning_rate=1e-5,
            weight_decay=0.01,
            warmup_steps=0,
            max_grad_norm=1.0,
            schedule="cosine",
            final_lr_ratio=0.0,
            frozen=(),
        ),
        batch=dict(micro_batches=8),
    )
    # "a small amount of GRPO training": inference 100 steps.
    c.stages.format = _rl_stage(FORMAT_ONLY, steps=100, sources=cot)
    c.stages.format.accuracy_reward = ""  # format rewards only: its evaluation scores with the r1 accuracy
    c.stages.accuracy = _rl_stage(FORMAT_ACCURACY, epochs=1, sources=cot)  # inference: 1 epoch
    c.stages.cliplow = _rl_stage(
        FORMAT_ACCURACY,
        epochs=1,
        sources=cot,
        eps_low=0.1,  # INFERENCE: ε_low < ε_high (value not public); sweep it
        num_iterations=2,
        mini_batches=2,
    )  # inference: > 1 update, so the clip can bind
    # Departure (affects only μ > 1 stages): π_old is the sampler's log-probs of the rollouts, recorded while sampling
    # at the same temperature, not a second forward pass; in bf16 the first update's ratio can differ slightly from 1.
    c.model.update(dtype="bfloat16", param_dtype="float32", min_pixels=56 * 56, max_pixels=401408)  # inference
    c.eval.update(
        sources=[
            {
                "kind": "jsonl",
                "path": "/path/to/emoset_cot/test.jsonl",
                "record_format": "jaxvlm",
                "answer_type": "string",
                "image_root": "",
            }
        ],
        num_examples=512,
        batch_size=32,
    )
    c.eval.sampling.max_new_tokens = 512
    c.train.update(save_every=200, eval_every=0)

    if variant == "tiny":
        _tiny(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    use_tiny_model(c, TINY_TASKS, max_new_tokens=32)
    tiny_data = dict(
        sources=[gym_source("train", 64, tasks=TINY_TASKS)],
        max_prompt_length=192,  # r1 gym prompts with a 56 px image: <= 105 tokens
        max_target_length=160,  # r1 reference targets of these tasks: <= 90 tokens
        on_error="skip",  # a too-long record is dropped and counted instead of stopping the run
    )
    s = c.stages.sft
    s.steps, s.epochs = 4, 0
    s.data.update(tiny_data, batch_size=4)
    s.batch.micro_batches = 2
    s.optimizer.learning_rate = 3e-3  # tiny: a random-weight toy model learns nothing at 1e-5 in a demo run
    for name in ("format", "accuracy", "cliplow"):
        s = c.stages[name]
        s.steps, s.epochs = 4, 0
        s.data.update({k: v for k, v in tiny_data.items() if k != "max_target_length"}, batch_size=2)  # no targets
        s.sampling.update(num_generations=4, max_new_tokens=48)
        s.optimizer.learning_rate = 1e-3  # tiny (see above)
        # 2 prompts x G 4 = 8 rows: 2 micro-batches (cliplow: 2 mini-batches x 2 micro-batches of 2 rows)
        s.batch.micro_batches = 2
