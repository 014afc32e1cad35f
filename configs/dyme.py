"""DyME (arXiv 2506.23061, ICLR 2026): one RL stage that switches per prompt between memorisation and exploration.

Spec: docs/methods.md §2. One stage, mode "dyme". At every step each prompt gets G rollouts; with
c = the number of rollouts whose accuracy reward is > 0.5:

  c == 0      memorisation: rollout slot 0 becomes the reference y* = reasoning + "\\nAnswer: " + answer, with
              advantage 1 on its tokens (a token-mean SFT row); the other G-1 rows get advantage 0
  0 < c < G   exploration: plain group-normalised GRPO advantages of the total reward
  c == G      nothing to learn: all advantages 0

Loss: GRPO token-mean per sequence, then mean over rows; beta = 0 (no KL, no reference model), μ = 1 update per
rollout batch, so the PPO clip never binds. Reward r = format + think + accuracy, each weight 1. Prompt style "dyme"
("... please use the format "Answer: .."", no <think> tags).

Variants (`--config configs/dyme.py:<variant>`):

  ""    the authors' default config (`config/config.py`, `--config norm`). Set the model and the data:
            python -m jaxvlm.main --config configs/dyme.py --workdir /tmp/dyme \\
              --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct \\
              --config.stages.dyme.data.sources[0].path=/data/chartqa/train.jsonl \\
              --config.eval.sources[0].path=/data/chartqa/test.jsonl
        The placeholder paths below (/path/to/...) must be replaced, element by element as above (config_flags cannot
        override a whole list), or in an edited copy of this file. Records: `{"image", "question", "answer",
        "hint"}` (DyME's own format reads directly; `hint` is the reference chain of thought); give numeric answers
        `"answer_type": "number"` per record.
  "tiny" the same stage on the built-in gym with the tiny random-weight model, on a CPU in seconds:
            python -m jaxvlm.main --config configs/dyme.py:tiny --workdir /tmp/dyme

Not part of the recipe: an SFT warm-up. The paper's default starts from the base model; its "two-stage" configs
(`config_llavacot`, `config_low`) start from an SFT checkpoint, which `configs/sft.py` can produce
(`--config.model.path=<that run's workdir>/final_model`).
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import base_config, check_variant, gym_source, stage, use_tiny_model

VARIANTS = ("", "tiny")

# r = r_format + r_think + r_acc, all weight 1 (docs/methods.md §2.3: the trainer sums rewards_per_func; the
# format-gated sum in compute_rewards.py is computed but unused, so we do not gate either).
DYME_REWARDS = [
    "format_dyme",  # "answer:" (any case) exactly once (checker.py, min_thinking_length 0)
    # The local "Pure DyME" thinking reward (main.py's default RewardCalculatorLocal): F1 of content-word lemmas of
    # the text before "answer:" vs the reference reasoning. Departure: a rule lemmatiser + stop-word list instead of
    # spaCy's POS filter (no spaCy model is available); the LLM "visual checker" of Full DyME is not implemented.
    {"name": "think_f1", "kwargs": {"extract": "dyme"}},
    # The text after the LAST "answer:", lowercased, '.' stripped; tolerance 0 during training (docs/methods.md §2.3,
    # §2.7).
    # Departure: no "answer:" scores 0 (DyME compares the whole text, which almost never matches anyway).
    {"name": "accuracy", "kwargs": {"extract": "dyme"}},
]

TINY_TASKS = ("exists", "count", "count_choice")  # short references: <= 87 tokens in the dyme style (see below)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/dyme.py")
    c = base_config()
    # The paper's sizes need a real checkpoint: --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct (no preset, so
    # forgetting the path stops the run at start-up instead of training a random tiny model on real data).
    c.model.preset = ""
    c.stage_order = ("dyme",)
    c.stages.dyme = stage(
        "dyme",
        steps=0,
        epochs=10,  # config.py: num_train_epochs 10
        data=dict(
            sources=[
                {
                    "kind": "jsonl",
                    # ChartQA train rewritten offline by the refiner with the default Goal/Observation template
                    # (data_utils/chart/pre_refinement.py). Placeholder: set your own path.
                    "path": "/path/to/chartqa/train_new_prerefine.jsonl",
                    "record_format": "jaxvlm",
                    "answer_type": "string",
                    "image_root": "",
                }
            ],
            # config.py: per-device 2 x grad-acc 16 x 8 GPUs = 256 completions = 32 prompts x G 8 per optimizer step
            batch_size=32,
            prompt_style="dyme",  # §2.5 prompt; reference = reasoning + "\nAnswer: " + answer
            # Inference: DyME sets no prompt limit (TRL 0.23 does not truncate VLM prompts); 2048 holds the question
            # and an image of up to 512 tokens (model.max_pixels 401,408). The reference width is
            # sampling.max_new_tokens (the trainer sets it).
            max_prompt_length=2048,
        ),
        rewards=DYME_REWARDS,
        accuracy_reward="accuracy",  # the switch uses answer correctness only (acc > 0.5), never format or think
        optimizer=dict(
            learning_rate=8e-5,  # DyME config.py: lr 8e-5 (other configs 1e-5, docs/methods.md §2.6)
            weight_decay=0.01,  # config.py
            warmup_steps=0,  # config.py
            max_grad_norm=1.0,  # config.py
            # Departure: the HF Trainer's default schedule is linear decay to 0 (DyME sets none); jaxvlm has cosine
            # or constant, and cosine to 0 is the closest.
            schedule="cosine",
            final_lr_ratio=0.0,
            frozen=("^visual/",),  # LLaVA-OV-0.5B: full fine-tune with the vision tower frozen (docs/methods.md §2.6)
        ),
        loss=dict(
            beta=0.0,  # asserted by DyME's trainer: no KL, no reference model
            eps_low=0.2,
            eps_high=0.2,  # TRL 0.23.1 default ε; no effect at μ = 1 (ratio ≡ 1 in value)
            num_iterations=1,  # TRL default μ = 1: one update per rollout batch
            aggregation="grpo",  # loss_type 'grpo': per-sequence token mean, then mean over rows
            advantage_scale="group",  # TRL scale_rewards="group": (r - mean) / (std_unbiased + 1e-4)
            dyme_granularity="prompt",  # the authors' code switches per prompt (group), not per batch
            dyme_correct_threshold=0.5,  # acc_rewards > 0.5
        ),
        # config.py: G 8, max_completion_length 300; TRL defaults temperature 1.0, top_p 1.0
        sampling=dict(num_generations=8, max_new_tokens=300, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
        # 256 rollout rows cut into 16 micro-batches of 16 (= 2 per device x 8 devices, grad-acc 16); one update per
        # rollout batch (rollouts are generated once per optimizer step: steps_per_generation = grad_acc).
        batch=dict(micro_batches=16, mini_batches=1),
    )
    # Precision: the authors train in bf16 (DeepSpeed); we compute in bf16 with float32 master weights.
    c.model.update(
        dtype="bfloat16",
        param_dtype="float32",
        # Inference: DyME's LLaVA-OV uses its own processor; 401,408 px (512 image tokens) is Curr-ReFT's
        # bound for Qwen2.5-VL, enough for charts.
        min_pixels=56 * 56,
        max_pixels=401408,
    )
    # In-training evaluation: greedy decoding with the stage's accuracy reward (tolerance 0). DyME evaluates ChartQA
    # greedily with max_new_tokens 1024 and 5% relaxed accuracy (eval/eval_chartqa.py): run that separately.
    c.eval.update(
        sources=[
            {
                "kind": "jsonl",
                "path": "/path/to/chartqa/test.jsonl",
                "record_format": "jaxvlm",
                "answer_type": "string",
                "image_root": "",
            }
        ],
        num_examples=512,
        batch_size=32,
    )
    c.eval.sampling.max_new_tokens = 1024
    c.train.update(save_every=200, eval_every=0)

    if variant == "tiny":
        _tiny(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """The same stage on the gym: tiny model, CPU, a few steps; `--config.stages.dyme.steps=N` for longer runs."""
    use_tiny_model(c, TINY_TASKS, max_new_tokens=48)
    s = c.stages.dyme
    s.steps, s.epochs = 4, 0
    s.data.update(
        # Gym tasks with short reference reasoning: in the dyme style with the built-in tokenizer the references
        # (+ end-of-turn) of exists / count / count_choice are at most 87 tokens, count_arithmetic's up to 114 and
        # grounding's 143. The memorisation rows' width is sampling.max_new_tokens, so these tasks fit in 96.
        sources=[gym_source("train", 64, tasks=TINY_TASKS)],
        batch_size=2,
        max_prompt_length=192,  # dyme-style gym prompts with a 56 px image: <= 88 tokens
        on_error="skip",  # a too-long record is dropped and counted (train/skipped/...) instead of stopping the run
    )
    s.sampling.update(num_generations=4, max_new_tokens=96)
    s.batch.update(micro_batches=2, mini_batches=1)  # 2 prompts x G 4 = 8 rows, 2 micro-batches of 4
    # Tiny: a random-weight toy model; the paper's 8e-5 would barely move it in a short demo run.
    s.optimizer.update(learning_rate=1e-3, frozen=("^visual/",))
