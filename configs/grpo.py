"""Plain GRPO with rule rewards: the "+GRPO" / "+RL" baseline of the seed papers.

One stage, mode "grpo": G rollouts per prompt, total reward = format + accuracy (weight 1 each), advantages
A = (r - mean_G) / (std_G + 1e-4) (unbiased std, TRL's scale_rewards="group"), the PPO-clipped token loss
-min(ρA, clip(ρ, 1 - ε, 1 + ε)A) + β·KL_k3, averaged per sequence then over rows (loss_type "grpo").
Prompt style "r1" (think/answer tags).

Which TRL defaults (docs/methods.md §6, §9.1):
  * taken: lr 1e-6, G 8, max_completion_length 512, ε 0.2 (ε_high = ε), μ = num_iterations 1, temperature 1.0,
    top_p 1.0, scale_rewards "group", weight decay 0 / warmup 0 / grad clip 1.0 (HF Trainer).
  * NOT taken: current TRL's beta 0.0 and loss_type "dapo". We use beta 0.04 (k3) and loss_type "grpo": the GRPO the
    seed papers compare against (TRL <= 0.15 defaults in the R1-V / Curr-ReFT trainer; DyME's `grpo_args` baseline
    sets beta 0.04 with loss_type 'grpo'). `--config.stages.grpo.loss.beta=0 --config.stages.grpo.loss.aggregation=dapo`
    gives today's TRL.
  * Departure: the HF default schedule is linear decay; jaxvlm has cosine (used, decaying to 0) or constant.
  * Departure: old log-probs (π_old in ρ) are the sampler's log-probs of the rollouts (same temperature), not a
    second forward pass; at μ = 1 the ratio is 1 in value either way.

Variants (`--config configs/grpo.py:<variant>`):

  ""    a real model and a JSONL of questions with verifiable answers; replace the /path/to/... placeholder:
            python -m jaxvlm.main --config configs/grpo.py --workdir /tmp/grpo \\
              --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct \\
              --config.stages.grpo.data.sources[0].path=/data/train.jsonl --config.eval.sources[0].path=/data/test.jsonl
  "tiny" gym tasks with the tiny random-weight model, on a CPU:
            python -m jaxvlm.main --config configs/grpo.py:tiny --workdir /tmp/grpo
  "dapo", "cispo", "sapo", "gspo": the same stage with a peer algorithm's settings (below; docs/methods.md §6.1), at
        full size like "", and "<name>_tiny" (e.g. "dapo_tiny") the same settings on the gym with the tiny model.

Algorithm variants (what changes from ""; every one drops the KL term, beta 0, as its source does):
  dapo   DAPO (Yu et al. 2025; verl's DAPO recipe): clip-higher eps_low 0.2 / eps_high 0.28, token-level loss
         (aggregation "dapo"), dynamic sampling (groups whose accuracies all agree, DAPO's 0 or 1, are dropped and
         the batch refilled, at most 10 sampling rounds: verl's metric=acc and max_num_gen_batches), DAPO's soft
         overlong punishment with
         L_cache = L_max / 5 (the paper's 4096 of 20480) and accuracy weighted 2 (the paper's +-1 reward, up to the
         constant the group mean removes), no format reward; G 16; AdamW weight decay 0.1, lr 1e-6 constant after a
         warmup of 20 rollout steps. Ours: 32 prompts a step in 4 updates (the paper: 512 prompts in 16).
  cispo  CISPO (MiniMax-M1, 2025), as TRL 1.16's loss_type "cispo": the stop-gradient weight min(r, 5) (TRL's docs'
         epsilon_high 5.0, from ScaleRL) on A log pi, global token mean (aggregation "dapo").
  sapo   SAPO (Gao et al. 2025, Qwen), as TRL's loss_type "sapo": the soft gate with tau_pos 1.0 / tau_neg 1.05 (the
         paper's and TRL's), sequence mean of token means (aggregation "grpo").
  gspo   GSPO (Zheng et al. 2025, Qwen), TRL's paper-index recipe: sequence-level ratio (importance "sequence"),
         clip 3e-4 / 4e-4, aggregation "grpo", each rollout batch in 4 mini-batches (steps_per_generation 4).
  cispo, sapo: 4 mini-batches a rollout batch as gspo (ours: at K = mu = 1 the ratio is 1 and every surrogate is the
  plain policy gradient; off-policy updates are where they differ).
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import base_config, check_variant, gym_source, stage, use_tiny_model

ALGORITHMS = ("dapo", "cispo", "sapo", "gspo")
VARIANTS = ("", "tiny", *ALGORITHMS, *(f"{name}_tiny" for name in ALGORITHMS))
TINY_TASKS = ("exists", "count_choice", "count")

# Format (think/answer tags, each exactly once: stricter than R1-V's lazy regex) + accuracy (by answer_type).
REWARDS = ["format_think_answer", "accuracy"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/grpo.py")
    c = base_config()
    # The paper's sizes need a real checkpoint: --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct (no preset, so
    # forgetting the path stops the run at start-up instead of training a random tiny model on real data).
    c.model.preset = ""
    c.stage_order = ("grpo",)
    c.stages.grpo = stage(
        "grpo",
        steps=0,
        epochs=1,  # TRL: num_train_epochs 3 (HF default); one epoch is usual for RL: inference
        data=dict(
            sources=[
                {
                    "kind": "jsonl",
                    "path": "/path/to/train.jsonl",
                    "record_format": "jaxvlm",
                    "answer_type": "string",
                    "image_root": "",
                }
            ],  # placeholder
            batch_size=16,  # inference: 16 prompts x G 8 = 128 rollouts per optimizer step
            prompt_style="r1",
            max_prompt_length=2048,  # inference: a question and an image of up to 512 tokens
        ),
        rewards=REWARDS,
        optimizer=dict(
            learning_rate=1e-6,
            weight_decay=0.0,
            warmup_steps=0,
            max_grad_norm=1.0,  # TRL / HF defaults
            schedule="cosine",
            final_lr_ratio=0.0,
            frozen=(),
        ),  # TRL trains the whole model
        loss=dict(
            beta=0.04,
            kl_estimator="k3",
            eps_low=0.2,
            eps_high=0.2,
            num_iterations=1,
            aggregation="grpo",
            advantage_scale="group",
        ),
        sampling=dict(num_generations=8, max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
        batch=dict(micro_batches=16, mini_batches=1),  # 128 rows in micro-batches of 8 (memory only)
    )
    c.model.update(dtype="bfloat16", param_dtype="float32", min_pixels=56 * 56, max_pixels=401408)  # TRL: bf16
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
    c.eval.sampling.max_new_tokens = 512
    c.train.update(save_every=200, eval_every=0)

    algorithm = variant.removesuffix("_tiny").removesuffix("tiny")
    if algorithm:
        use_algorithm(c.stages.grpo, algorithm)
    if variant.endswith("tiny"):
        use_tiny_model(c, TINY_TASKS, max_new_tokens=32)
        s = c.stages.grpo
        s.steps, s.epochs = 4, 0
        s.data.update(
            sources=[gym_source("train", 64, tasks=TINY_TASKS)],
            batch_size=2,
            max_prompt_length=192,  # r1 gym prompts with a 56 px image: <= 105 tokens
            on_error="skip",  # a too-long record is dropped and counted instead of stopping the run
        )
        s.sampling.update(num_generations=4, max_new_tokens=48)
        s.batch.update(micro_batches=2 if s.batch.mini_batches == 1 else 1)  # 2 prompts x G 4 = 8 rows
        s.optimizer.update(
            learning_rate=1e-3, warmup_steps=0
        )  # tiny: a random-weight toy model; 1e-6 would not move it
        if algorithm == "dapo":
            s.dynamic_sampling.max_rounds = 3
            s.rewards = dapo_rewards(s.sampling.max_new_tokens)
    return c


def dapo_rewards(max_new_tokens: int) -> list:
    """DAPO's reward: accuracy as +-1 (weight 2 on jaxvlm's 0/1: the same advantages) plus the soft overlong
    punishment over the last fifth of the completion budget (the paper's L_cache 4096 of L_max 20480)."""
    return [
        {"name": "accuracy", "weight": 2.0},
        {"name": "soft_overlong", "kwargs": {"soft_punish_cache": max_new_tokens // 5}},
    ]


def use_algorithm(s: ml_collections.ConfigDict, name: str) -> None:
    """Stage `s` with the settings of `name` (the module docstring says where each comes from)."""
    s.loss.update(beta=0.0)
    if name == "dapo":
        s.loss.update(eps_low=0.2, eps_high=0.28, aggregation="dapo")
        s.dynamic_sampling.update(enabled=True, max_rounds=10, filter="accuracy")
        s.data.batch_size = 32
        s.sampling.num_generations = 16
        s.rewards = dapo_rewards(s.sampling.max_new_tokens)
        s.batch.update(mini_batches=4, micro_batches=16)  # 512 rows: 4 updates of 128, micro-batches of 8
        s.optimizer.update(schedule="constant", warmup_steps=20 * 4, weight_decay=0.1)  # 20 rollout steps x 4
    elif name == "cispo":
        s.loss.update(surrogate="cispo", cispo_eps_max=5.0, aggregation="dapo")
        s.batch.update(mini_batches=4, micro_batches=4)  # 128 rows: 4 updates of 32, micro-batches of 8
    elif name == "sapo":
        s.loss.update(surrogate="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, aggregation="grpo")
        s.batch.update(mini_batches=4, micro_batches=4)
    elif name == "gspo":
        s.loss.update(importance="sequence", eps_low=3e-4, eps_high=4e-4, aggregation="grpo")
        s.batch.update(mini_batches=4, micro_batches=4)
    else:
        raise ValueError(f"configs/grpo.py: unknown algorithm {name!r}; one of {ALGORITHMS}")
