"""Infi-MMR (arXiv 2505.23091): phased rule-based RL that moves from text to multimodal reasoning.

Spec: docs/methods.md §5. The paper's README and framework figure give the phases and the algorithm;
no training code or hyperparameters were released. Three GRPO stages, each starting from the previous one:

  text          "Foundational Reasoning Activation": text-only reasoning data (a competition-style math problem in
                the figure; DeepScaleR ~40k per secondary notes)
  caption       "Cross-Modal Reasoning Adaptation": multimodal data with the image caption prepended to the question
                (`data.with_caption=True`: "Caption: ...\\n{question}")
  caption_free  "Multimodal Reasoning Enhancement": curated multimodal data without captions

GRPO with a rule-based Format + Accuracy reward and a KL penalty to a frozen reference (framework figure; nothing
indicates DAPO tricks). The KL reference is re-anchored to each stage's starting weights by the trainer (inference:
the figure shows one frozen reference; re-anchoring per phase is how the R1-V lineage chains runs).

INFERENCE, chosen because the paper gives no value: G 8, lr 1e-6, β 0.04 (k3), 1 epoch per phase, 1,024 new tokens,
16 prompts per step, temperature 1.0 (TRL's GRPO defaults of the time, except the longer completions for math).
Also inference (secondary notes conflict): phases 2 and 3 use the same multimodal pool (e.g. ViRL39K) with and
without captions (e.g. from OmniCaptioner).

Variants (`--config configs/infi_mmr.py:<variant>`):

  ""    the three phases for Qwen2.5-VL-3B-Instruct (the paper's base). Set the model, replace the /path/to/...
        placeholders (the multimodal JSONL needs a `caption` per record):
            python -m jaxvlm.main --config configs/infi_mmr.py --workdir /tmp/infi_mmr \\
              --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct \\
              --config.stages.text.data.sources[0].path=/data/deepscaler.jsonl \\
              --config.stages.caption.data.sources[0].path=/data/mm_captioned.jsonl \\
              --config.stages.caption_free.data.sources[0].path=/data/mm_captioned.jsonl
  "tiny" the same phases on the built-in gym (text-only `word_arithmetic`, then counting / arithmetic / attribute
        tasks with the gym's faithful captions, then without) with the tiny random-weight model, on a CPU:
            python -m jaxvlm.main --config configs/infi_mmr.py:tiny --workdir /tmp/infi_mmr
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import base_config, check_variant, gym_source, stage, use_tiny_model

VARIANTS = ("", "tiny")
STAGES = ("text", "caption", "caption_free")
TINY_TEXT_TASKS = ("word_arithmetic",)
TINY_MULTIMODAL_TASKS = ("count", "count_arithmetic", "largest_attribute")  # math-like open answers

# Format (think/answer tags, each once) + accuracy (dispatched on answer_type: math via math-verify, numbers,
# strings, choice letters), weight 1 each. Inference: the weights are not given (notes: "combined with weights").
REWARDS = ["format_think_answer", "accuracy"]


def _phase(sources: list, *, with_caption: bool, text_only: bool) -> ml_collections.ConfigDict:
    return stage(
        "grpo",
        steps=0,
        epochs=1,  # inference
        data=dict(
            sources=sources, batch_size=16, prompt_style="r1", with_caption=with_caption, max_prompt_length=2048
        ),  # inference: room for a caption and a 512-token image
        rewards=REWARDS,
        optimizer=dict(
            learning_rate=1e-6,  # inference (TRL default)
            weight_decay=0.0,
            warmup_steps=0,
            max_grad_norm=1.0,  # inference (HF defaults)
            schedule="cosine",
            final_lr_ratio=0.0,  # inference; the HF default is linear decay
            # The text-only phase has no images, so the vision tower gets no gradient; freezing it also keeps AdamW's
            # decoupled weight decay and optimizer state off it. The multimodal phases train the whole model
            # (inference, as in the R1-V lineage).
            frozen=("^visual/",) if text_only else (),
        ),
        loss=dict(
            beta=0.04,
            kl_estimator="k3",  # KL penalty (framework figure); value and estimator: inference
            eps_low=0.2,
            eps_high=0.2,
            num_iterations=1,  # plain GRPO, one update per rollout batch (inference)
            aggregation="grpo",
            advantage_scale="group",
        ),
        sampling=dict(num_generations=8, max_new_tokens=1024, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
        batch=dict(micro_batches=16, mini_batches=1),  # 128 rows in micro-batches of 8 (memory only)
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg, VARIANTS, "configs/infi_mmr.py")
    c = base_config()
    # The paper's sizes need a real checkpoint: --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct (no preset, so
    # forgetting the path stops the run at start-up instead of training a random tiny model on real data).
    c.model.preset = ""
    c.stage_order = STAGES
    # Placeholders. Text: verifiable math problems (DeepScaleR per the notes), answers scored as math.
    text = [
        {
            "kind": "jsonl",
            "path": "/path/to/deepscaler/train.jsonl",
            "record_format": "jaxvlm",
            "answer_type": "math",
            "image_root": "",
        }
    ]
    # Multimodal: one pool with a `caption` field per record (decontaminated against the benchmarks, per the notes).
    multimodal = [
        {
            "kind": "jsonl",
            "path": "/path/to/virl39k_captioned/train.jsonl",
            "record_format": "jaxvlm",
            "answer_type": "math",
            "image_root": "",
        }
    ]
    c.stages.text = _phase(text, with_caption=False, text_only=True)
    c.stages.caption = _phase(multimodal, with_caption=True, text_only=False)
    c.stages.caption_free = _phase(multimodal, with_caption=False, text_only=False)
    c.model.update(dtype="bfloat16", param_dtype="float32", min_pixels=56 * 56, max_pixels=401408)  # inference
    # The paper reports MathVerse / MathVision / OlympiadBench / MathVista; point eval at one of them (placeholder).
    c.eval.update(
        sources=[
            {
                "kind": "jsonl",
                "path": "/path/to/mathvista_testmini.jsonl",
                "record_format": "jaxvlm",
                "answer_type": "math",
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
    # Eval on the multimodal target tasks (in each stage's prompt: with captions after the caption phase).
    use_tiny_model(c, TINY_MULTIMODAL_TASKS, max_new_tokens=32)
    for name, tasks in (
        ("text", TINY_TEXT_TASKS),
        ("caption", TINY_MULTIMODAL_TASKS),
        ("caption_free", TINY_MULTIMODAL_TASKS),
    ):
        s = c.stages[name]
        s.steps, s.epochs = 4, 0
        s.data.update(
            sources=[gym_source("train", 64, tasks=tasks)],
            batch_size=2,
            # r1 gym prompts: <= 105 tokens; with the caption prepended up to ~180 (6 shapes)
            max_prompt_length=256 if s.data.with_caption else 192,
            on_error="skip",  # a too-long record is dropped and counted instead of stopping the run
        )
        s.sampling.update(num_generations=4, max_new_tokens=48)
        s.batch.micro_batches = 2  # 2 prompts x G 4 = 8 rows in 2 micro-batches
        s.optimizer.learning_rate = 1e-3  # tiny: a random-weight toy model; 1e-6 would not move it
