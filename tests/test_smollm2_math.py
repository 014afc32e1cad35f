"""configs/smollm2_math.py and its runner (jaxvlm.experiments_text): the arms' settings and equal prompt budgets, the
start-up error without a checkpoint, and every arm's CI form (`<arm>_tiny`) through the real trainer on a tiny random
Llama checkpoint with a ChatML tokenizer, ending in the comparison's table, plot and completions file. The real runs
(SmolLM2-135M-Instruct, minutes per arm) are not part of the tests."""

from __future__ import annotations

import json
import math
import os

import pytest

from jaxvlm import configuration, experiments, experiments_text, rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
recipe = experiments_text.recipe()
TRAINING_ARMS = ("sft", "grpo", "dyme")


@pytest.mark.parametrize("variant", recipe.VARIANTS)
def test_every_variant_needs_a_checkpoint_and_then_passes_the_checks(variant):
    c = recipe.get_config(variant)
    with pytest.raises(configuration.ConfigError, match=r"^config\.model\.path: this config trains a real") as info:
        configuration.check_config(c)
    assert "\n" not in str(info.value)  # one line
    c.model.path = "/path/to/SmolLM2-135M-Instruct"
    spec = configuration.check_config(c)
    assert spec.model.preset == "" and spec.model.tokenizer == ""  # the tokenizer is the checkpoint's
    assert recipe.get_config("").to_dict() == recipe.get_config("grpo").to_dict()


@pytest.mark.parametrize("tiny", [False, True])
def test_arms_share_the_prompt_budget_and_the_evaluation(tiny):
    configs = {arm: experiments_text.arm_config(arm, 0, "/ckpt", tiny=tiny) for arm in experiments_text.ARMS}
    prompts = {arm: experiments_text.prompts_of(configs[arm]) for arm in TRAINING_ARMS}
    assert len(set(prompts.values())) == 1 and experiments_text.prompts_of(configs["base"]) == 0
    steps = recipe.TINY["steps"] if tiny else recipe.STEPS
    assert prompts["grpo"] == steps * recipe.PROMPTS_PER_STEP
    base = configs["base"].stages.base
    for arm, c in configs.items():
        assert c.model.dtype == c.model.param_dtype == "float32"
        assert c.eval.sources[0] == dict(base.data.sources[0])  # the base arm scores the same problems
        assert c.eval.sources[0]["split"] == recipe.EVAL_SPLIT == "test"
        assert c.eval.num_examples == base.num_examples and c.eval.sampling.temperature == 0.0
        assert c.eval.sampling.max_new_tokens == base.sampling.max_new_tokens
        if arm in TRAINING_ARMS:
            s = c.stages[arm]
            assert s.data.sources[0]["split"] == "train" and s.data.batch_size == recipe.PROMPTS_PER_STEP
            assert s.data.prompt_style == base.data.prompt_style == "final_answer"
    for arm in ("grpo", "dyme"):
        s = configs[arm].stages[arm]
        assert s.sampling.num_generations == 4 and s.sampling.temperature == 1.0
        assert s.sampling.max_new_tokens == configs[arm].eval.sampling.max_new_tokens
        assert s.loss.aggregation == "grpo" and s.loss.eps_low == s.loss.eps_high == 0.2
        assert s.loss.beta == (0.04 if arm == "grpo" else 0.0)  # DyME trains without KL (the authors assert it)
        names = [spec.name for spec in rewards.parse_reward_specs(list(s.rewards))]
        assert names[0] == "format_final_answer" and names[-1] == "accuracy" and s.accuracy_reward == "accuracy"
    assert configs["grpo"].stages.grpo.loss.kl_estimator == "k3"
    for arm in experiments_text.ARMS:  # the runner's --eval-split and --steps
        c = experiments_text.arm_config(arm, 0, "/ckpt", tiny=tiny, eval_split="validation", steps=3)
        assert c.eval.sources[0]["split"] == "validation" and c.eval.sources[0]["tasks"] == (recipe.TASK,)
        if arm == "base":
            assert c.stages.base.data.sources[0]["split"] == "validation"
        else:
            assert c.stages[arm].steps == 3 and c.stages[arm].data.sources[0]["split"] == "train"
    if not tiny:
        assert 64 <= recipe.MAX_NEW_TOKENS <= 96 and 150 <= recipe.EVAL_EXAMPLES <= 256
        assert configs["dyme"].stages.dyme.loss.dyme_granularity == "prompt"


def test_the_runner_refuses_a_missing_checkpoint_and_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="--model-path is required"):
        experiments.main(["--only", "smollm2_math", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        experiments.main(["--only", "smollm2_maths", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown arm"):
        experiments.main(["--only", "smollm2_math", "--out", str(tmp_path), "--model-path", "x", "--arms", "ppo"])
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["smollm2_math"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random LlamaForCausalLM (tied embeddings, as SmolLM2) saved with the built-in ChatML tokenizer
    (`<|im_end|>` is its eos) trained on the gym's text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxvlm.tokenizer import build_tokenizer, builtin_corpus

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tokenizer = build_tokenizer(builtin_corpus(num_examples=200), path, vocab_size=512)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=1e5),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_every_arm_runs_through_the_trainer(checkpoint, tmp_path):
    """Each arm's tiny form: 2 training steps (none for base) and an 8-problem greedy evaluation; then the results,
    table, plot and completions file of the comparison."""
    results = experiments_text.run(str(tmp_path), checkpoint, [0], tiny=True)
    out = tmp_path / "smollm2_math"
    assert set(results) == set(experiments_text.ARMS)
    for arm in experiments_text.ARMS:
        r = results[arm]["0"]
        assert r["examples"] == recipe.TINY["eval_examples"]
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["stderr"]) and 0.0 <= r["format"] <= 1.0
        workdir = out / "runs" / "seed0" / arm
        records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        train = [rec for rec in records if "train/stage" in rec]
        if arm == "base":
            assert not train and (workdir / "eval" / "base" / "summary.json").is_file()
            continue
        assert [rec["train/stage_step"] for rec in train] == [1, 2]  # the stage ran its 2 steps
        for rec in train:
            assert math.isfinite(rec["train/loss"]) and math.isfinite(rec["train/grad_norm"])
            assert rec["train/update_skipped"] == 0.0
        if arm != "sft":
            assert all(math.isfinite(rec["train/rewards/format_final_answer/mean"]) for rec in train)
            assert len(r["curve"]["rewards/accuracy/mean"]) == 2
        assert not (workdir / "checkpoints").exists() and not (workdir / "final_model").exists()  # cleaned up
        assert json.load(open(workdir / "progress.json"))["completed"] == {arm: 2}
    saved = json.load(open(out / "results.json"))
    assert set(saved) == set(experiments_text.ARMS) and list(saved["grpo"]) == ["0"]
    text = (out / "RESULTS_TABLE.md").read_text()
    for label in experiments_text.LABELS.values():
        assert f"| {label}" in text
    assert "(N = 8)" in text
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    completions = (out / "completions.md").read_text()
    assert completions.count("*DyME, seed 0*") == recipe.TINY["eval_examples"]
    # Run again: every arm is in results.json, so nothing trains (the base arm is not re-run for another seed).
    again = experiments_text.run(str(tmp_path), checkpoint, [0], tiny=True, arms=("base",))
    assert again == saved
