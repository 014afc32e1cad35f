"""Text RL on a real pretrained model: SmolLM2-135M-Instruct learns the gym's word problems (base / SFT / GRPO / DyME).

The arms of one comparison, each a variant of this file, all with the same prompt budget (an RL prompt yields G
rollouts; an SFT example counts as one prompt) and the same held-out evaluation:

  base   no training: the checkpoint evaluated as it is (an eval stage)
  sft    SFT on the gym's reference chains of thought (mode sft, docs/methods.md §1.5)
  grpo   GRPO with TRL-like settings (mode grpo, docs/methods.md §6): format + accuracy rewards, β 0.04 (k3)
  dyme   DyME's per-prompt switch (mode dyme, docs/methods.md §2): no correct rollout -> memorise the reference,
         some -> GRPO, all -> skip; rewards format + think F1 + accuracy; β 0 (DyME asserts it)

    python -m jaxvlm.main --config configs/smollm2_math.py:grpo --workdir /tmp/smollm2-grpo \\
        --config.model.path=/path/to/SmolLM2-135M-Instruct
    python -m jaxvlm.experiments --only smollm2_math --model-path /path/to/SmolLM2-135M-Instruct \\
        --seeds 0,1,2 --out /tmp/smollm2-math        # every arm and seed, the table, the plot, the completions

`--config.model.path` names a Hugging Face checkpoint directory (its tokenizer and chat template are used; nothing is
downloaded); without it the run stops at start-up (`config.model.path: this config trains a real checkpoint ...`).
"" is the grpo arm. `<arm>_tiny` variants are the same arms at CI size (2 steps, 8 evaluated problems, room for any
tokenizer's prompts and references; tests/test_smollm2_math.py runs them on a tiny random Llama checkpoint).

Data: the gym's `word_problems` (jaxvlm.data.gym): "Tom has 5 apples, buys 3 more and then gives 2 to Anna. How many
apples does Tom have now?", 1 event (difficulty 0), 2 (1) or 3 (2), small numbers (start 2-12, each event 1-9). The
reference reasoning: "Tom starts with 5 apples. After buying 3 more, Tom has 5 + 3 = 8 apples. After giving 2 to
Anna, Tom has 8 - 2 = 6 apples. The answer is 6." Training draws from the train split, the evaluation from the test
split (`EVAL_SPLIT`; the validation split for tuning: `--config.eval.sources[0].split=validation`, for the base arm
`--config.stages.base.data.sources[0].split=validation`); splits never share a problem (the gym's signature hash).

Why these values. Calibration with transformers `generate` (greedy, 96 new tokens, SmolLM2's own chat template),
32 validation problems per cell, so a cell's standard error is about 0.09:

  * Task mix `DIFFICULTIES = (0, 0, 1)`: two thirds one-event, one third two-event problems. With this prompt the
    base model is right on 0.47 of one-event problems, 0.00-0.03 of two-event ones (it does the first event and
    stops) and 0.00-0.09 of three-event ones. Measured in jaxvlm on the 192-problem validation set of the mix: base
    0.276 (one event 0.406, two events 0.016), inside the 25-60% window, with room up and down; the two-event third
    is where carrying on past the first step shows. (A first wording, one sentence per event, "Leo has 5 cards. Leo
    buys 4 more.", scored 0.16 on one event: the model does better with the events in one sentence.)
  * Prompt style "final_answer" (jaxvlm.data.prompts): the question, then `End your reply with "The answer is N."`.
    One-event problems: 0.47 correct by last number, 0.41-0.47 of replies end with the sentence, none cut at 96
    tokens. Alternatives: the bare question 0.34 (19% of replies cut at 96 tokens), `End your reply with
    "Answer: N"` 0.38, `Put the final answer in \\boxed{}` 0.41 by last number but 0.00 by the box's content (19%
    write one box, never with the right number), "Show your working, then finish with ..." 0.41 (25% cut), "Work it
    out, then end with ..." 0.44 (22% cut), "Think step by step, then finish with ..." 0.33 on word_arithmetic
    (long reasoning, cut off). No system prompt is added: the chat template puts in its own.
  * Rewards: accuracy reads the LAST NUMBER of the reply (`extract: last_number`: the closing sentence when there is
    one, else the last result; a reply that runs on after its answer loses it) and compares it as a number,
    tolerance 0 (`use_math_verify: False`: integer answers, no math-verify worker). Format: `format_final_answer`
    (exactly one "The answer is N.", closing the reply); base replies meet it 0.28 of the time on validation (the
    others ramble on, "This is a classic example of a logical fallacy ...", or repeat the sentence). DyME adds
    `think_f1` (the text before the last number against the reference's word lemmas). The SFT references are the
    gym's reasoning, which ends with the same sentence.
  * G 4, 4 prompts per step (16 rollouts), temperature 1.0 (TRL's default; the rollouts' accuracy is ~0.1, far
    below greedy: most groups have no correct rollout), β 0.04 with k3 (GRPO; DyME: 0), ε 0.2, μ 1, loss_type
    "grpo", constant lr without warmup, grad clip 1.0, float32 (the CPU).
  * 64 new tokens (`MAX_NEW_TOKENS`, rollouts, DyME's memorised references and the evaluation) and prompts padded to
    80 tokens: with SmolLM2's tokenizer references are <= 39 / 60 / 81 tokens with end-of-turn and prompts 59-64 /
    64-71 / 69-78 (1 / 2 / 3 events), so the mix fits (three-event references do not fit DyME's 64: raise
    MAX_NEW_TOKENS to use difficulty 2 with DyME). 64 instead of 96 cuts every step's and the evaluation's tokens
    by a third; base replies average 36 tokens.
  * lr, measured (GRPO, 12 steps, one seed, validation, base 0.276 / format 0.28): 1e-6 -> 0.302 (format 0.42, KL
    0.001); 5e-6 -> 0.427 (one event 0.61, two 0.06; format 0.67, KL 0.02; the rambling replies drop from 32% to
    10%); 1e-5 -> 0.297 (format 0.48, KL 0.05: the replies now repeat "The answer is N." (37%) and the arithmetic
    gets worse). `RL_LR = 5e-6` for GRPO and DyME. SFT at `SFT_LR = 1e-5` (DyME's SFT baseline lr, docs/methods.md
    §7), 12 steps: loss 0.74 -> 0.09, validation 0.719 (one event 0.81, two 0.53; the replies copy the reference
    template, think F1 0.97).
  * Steps `STEPS = 12` per arm (48 prompts): a GRPO run of 12 steps + the 192-problem evaluation used 725-745 CPU
    seconds (user + system; 734-896 s wall with another 1-core job on this 2-core machine): per step ~40 CPU s
    (16 rollouts of 64 tokens, the KL reference's forward, one update of 16 x 144 tokens), the evaluation ~130,
    start-up and compilation ~60. On both cores to itself that is ~7-8 minutes (JAX used ~1.5 cores when it had
    them): 5-8 minutes per GRPO run keeps base + SFT + GRPO + DyME for 3 seeds, and a TRL GRPO run per seed, under
    two hours on this CPU. An SFT run of 12 steps: 247 CPU s. Another budget:
    `--config.stages.<arm>.steps=N`, or `--steps N` for the runner.

Sizes and lr were tuned on the validation split; the comparison's numbers are on the test split.
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import base_config, check_variant, gym_source, stage

ARMS = ("base", "sft", "grpo", "dyme")
VARIANTS = ("", *ARMS, *(f"{arm}_tiny" for arm in ARMS))

TASK = "word_problems"
DIFFICULTIES = (0, 0, 1)  # cycled per example: 2/3 one-event, 1/3 two-event problems (see the docstring)
GYM_SEED = 0  # the problems (train and held-out) are the same for every run seed; the seed shuffles and samples
TRAIN_EXAMPLES = 2000  # the train split drawn from (more than any arm reads: no problem is seen twice)
EVAL_SPLIT = "test"
EVAL_EXAMPLES = 192  # held-out problems, greedy: one evaluation's standard error is sqrt(p(1-p)/192) <= 0.036
EVAL_BATCH = 64

PROMPT_STYLE = "final_answer"  # jaxvlm.data.prompts: question + 'End your reply with "The answer is N."'
ACCURACY = {"name": "accuracy", "kwargs": {"extract": "last_number", "use_math_verify": False}}
FORMAT = "format_final_answer"
GRPO_REWARDS = [FORMAT, ACCURACY]
DYME_REWARDS = [FORMAT, {"name": "think_f1", "kwargs": {"extract": "last_number"}}, ACCURACY]

NUM_GENERATIONS = 4  # G
PROMPTS_PER_STEP = 4  # RL: 4 prompts x G 4 = 16 rollouts per step; SFT: 4 examples per step (the same prompts)
MAX_NEW_TOKENS = 64  # rollouts, DyME's reference width and the evaluation
MAX_PROMPT_LENGTH = 80  # SmolLM2's system prompt + question + instruction: 59-64 / 64-71 / 69-78 tokens (1/2/3 events)
STEPS = 12  # per arm; prompts per arm = STEPS x PROMPTS_PER_STEP = 48 (the docstring: timing)
RL_LR = 5e-6  # GRPO and DyME (measured against 1e-6 and 1e-5: the docstring)
SFT_LR = 1e-5  # DyME's SFT baseline lr
TEMPERATURE = 1.0

# The CI forms: every arm through the real trainer in seconds on a tiny random checkpoint. Room for prompts and
# references in any tokenizer (a small BPE trained on other text spends up to ~120 / ~110 tokens on them).
TINY = dict(steps=2, eval_examples=8, eval_batch=8, max_new_tokens=128, max_prompt_length=128, train_examples=64)


def gym(split: str, n: int) -> dict:
    """A source entry of the comparison's problems (also what the TRL comparison script reads)."""
    return gym_source(split, n, tasks=(TASK,), difficulties=DIFFICULTIES, seed=GYM_SEED)


def _data(n: int, max_prompt_length: int, max_new_tokens: int, *, targets: bool) -> dict:
    data = dict(
        sources=[gym("train", n)],
        batch_size=PROMPTS_PER_STEP,
        prompt_style=PROMPT_STYLE,
        max_prompt_length=max_prompt_length,
        prompt_buckets=(max_prompt_length,),  # one padded prompt length: one compilation, no padding to 128
        shuffle=True,
    )
    if targets:
        data["max_target_length"] = max_new_tokens  # SFT references + end-of-turn: <= 39 / 60 tokens (1 / 2 events)
    return data


def _optimizer(lr: float) -> dict:
    # Constant lr, no warmup, no decay, grad clip 1.0 (TRL / HF: weight decay 0, max_grad_norm 1.0).
    return dict(learning_rate=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)


def _rl_stage(mode: str, steps: int, n: int, max_prompt_length: int, max_new_tokens: int) -> ml_collections.ConfigDict:
    dyme = mode == "dyme"
    loss = dict(
        beta=0.0 if dyme else 0.04,  # GRPO: TRL <= 0.15's β 0.04 with the k3 estimator; DyME: no KL (asserted)
        eps_low=0.2,
        eps_high=0.2,
        num_iterations=1,  # μ 1: one update per rollout batch, so the ratio is 1 in value and the clip never binds
        aggregation="grpo",  # loss_type "grpo": per-sequence token mean, then the mean over rows
        advantage_scale="group",  # (r - mean_G) / (std_G + 1e-4), TRL's scale_rewards="group"
    )
    if dyme:
        loss.update(dyme_granularity="prompt", dyme_correct_threshold=0.5)
    else:
        loss["kl_estimator"] = "k3"
    return stage(
        mode,
        steps=steps,
        data=_data(n, max_prompt_length, max_new_tokens, targets=False),
        rewards=DYME_REWARDS if dyme else GRPO_REWARDS,
        accuracy_reward="accuracy",
        optimizer=_optimizer(RL_LR),
        loss=loss,
        sampling=dict(
            num_generations=NUM_GENERATIONS,
            max_new_tokens=max_new_tokens,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
        ),
        batch=dict(micro_batches=1, mini_batches=1),  # 16 rows: one micro-batch, one optimizer update per step
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/smollm2_math.py") or "grpo"
    arm, tiny = variant.removesuffix("_tiny"), variant.endswith("_tiny")
    steps = TINY["steps"] if tiny else STEPS
    eval_examples = TINY["eval_examples"] if tiny else EVAL_EXAMPLES
    eval_batch = TINY["eval_batch"] if tiny else EVAL_BATCH
    max_new_tokens = TINY["max_new_tokens"] if tiny else MAX_NEW_TOKENS
    train_examples = TINY["train_examples"] if tiny else TRAIN_EXAMPLES
    max_prompt_length = TINY["max_prompt_length"] if tiny else MAX_PROMPT_LENGTH

    c = base_config()
    # A real checkpoint only: --config.model.path=DIR (its tokenizer too). No preset, so forgetting the path stops
    # the run at start-up instead of training a random toy model.
    c.model.update(preset="", path="", dtype="float32", param_dtype="float32")
    c.mesh.shape = (1, 1, 1)
    c.train.update(
        log_every=1, eval_every=0, save_every=max(steps, 1), keep_checkpoints=1, progress=True, tensorboard=False
    )
    c.eval.update(sources=[gym(EVAL_SPLIT, eval_examples)], num_examples=eval_examples, batch_size=eval_batch)
    c.eval.sampling.update(num_generations=1, temperature=0.0, max_new_tokens=max_new_tokens)

    if arm == "base":
        # The same evaluation as the training arms' final one (config.eval), as an eval stage: no training.
        c.stage_order = ("base",)
        c.stages.base = stage(
            "eval",
            data=dict(
                sources=[gym(EVAL_SPLIT, eval_examples)],
                batch_size=eval_batch,
                prompt_style=PROMPT_STYLE,
                max_prompt_length=max_prompt_length,  # padded as the training stages' evaluation pads (to 128)
            ),
            num_examples=eval_examples,
            sampling=dict(num_generations=1, temperature=0.0, max_new_tokens=max_new_tokens),
            rewards=[ACCURACY],
            accuracy_reward="accuracy",
        )
    elif arm == "sft":
        c.stage_order = ("sft",)
        c.stages.sft = stage(
            "sft",
            steps=steps,
            data=_data(train_examples, max_prompt_length, max_new_tokens, targets=True),
            optimizer=_optimizer(SFT_LR),
            loss=dict(sft_aggregation="token"),  # HF: mean over the batch's target tokens
            batch=dict(micro_batches=1),
        )
    else:
        c.stage_order = (arm,)
        c.stages[arm] = _rl_stage(arm, steps, train_examples, max_prompt_length, max_new_tokens)
    return c
