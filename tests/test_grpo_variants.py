"""configs/grpo.py and its algorithm variants (dapo, cispo, sapo, gspo): each full-size variant carries its source's
settings, and `:tiny` and each `<name>_tiny` variant train on the gym through the trainer in one run, a stage each:
the plain GRPO stage first, two steps, stopped after the first (a checkpoint is written) and resumed with the same
command (test_recipes.py's check, for this recipe), then one step of every variant with the trainer's log-probs as
pi_old and one of the four sampler corrections switched on."""

from __future__ import annotations

import json
import os

import pytest

from jaxvlm import configuration, rewards, trainer
from jaxvlm.metrics import read_metrics
from test_recipes import load_config, reduced
from test_trainer import StopAfter

ALGORITHMS = ("dapo", "cispo", "sapo", "gspo")
# The correction each variant's stage runs with here (the variants themselves leave it off, as TRL does without vLLM).
CORRECTIONS = {
    "dapo": "sequence_truncate",
    "cispo": "token_truncate",
    "sapo": "token_mask",
    "gspo": "sequence_mask",
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_full_size_variant_has_its_sources_settings(name):
    s = load_config("grpo", name).stages.grpo
    loss = s.loss
    assert loss.beta == 0.0
    assert (loss.old_logp, loss.sampler_correction) == ("sampler", "none")
    if name == "dapo":
        assert (loss.surrogate, loss.eps_low, loss.eps_high, loss.aggregation) == ("clip", 0.2, 0.28, "dapo")
        assert s.dynamic_sampling.enabled and s.dynamic_sampling.max_rounds == 10
        assert s.dynamic_sampling.filter == "accuracy"  # DAPO drops the prompts solved 0 or G times
        assert s.sampling.num_generations == 16
        rewards = {r["name"]: r for r in s.rewards}
        assert set(rewards) == {"accuracy", "soft_overlong"}
        assert rewards["soft_overlong"]["kwargs"]["soft_punish_cache"] == s.sampling.max_new_tokens // 5
    else:
        assert not s.dynamic_sampling.enabled
        assert s.batch.mini_batches == 4  # off-policy updates, where the surrogates differ
    if name == "cispo":
        assert (loss.surrogate, loss.cispo_eps_max, loss.aggregation) == ("cispo", 5.0, "dapo")
    if name == "sapo":
        assert (loss.surrogate, loss.sapo_temperature_pos, loss.sapo_temperature_neg) == ("sapo", 1.0, 1.05)
        assert loss.aggregation == "grpo"
    if name == "gspo":
        assert (loss.importance, loss.eps_low, loss.eps_high, loss.aggregation) == ("sequence", 3e-4, 4e-4, "grpo")


SIGNAL = "test_text_length_parity"
if SIGNAL not in rewards.REWARDS:

    @rewards.register(SIGNAL)
    def text_length_parity(completion: str, example=None) -> float:
        """A reward that differs between the random tiny model's rollouts (its task rewards are all 0, which gives
        no advantage, no gradient and a ratio that never moves)."""
        return float(len(completion) % 2)


def variants_run_config():
    """configs/grpo.py:tiny (two steps, as test_recipes.py runs every recipe), then the tiny variants as further
    stages of the same run, one step each, pi_old recomputed, a correction each."""
    config = reduced(load_config("grpo", "tiny"))
    for name in ALGORITHMS:
        s = load_config("grpo", f"{name}_tiny").stages.grpo
        s.steps, s.epochs = 1, 0
        s.sampling.max_new_tokens = 16
        s.rewards = [*s.rewards, SIGNAL]
        s.loss.update(old_logp="recompute", sampler_correction=CORRECTIONS[name])
        config.stages[name] = s
    config.stage_order = ("grpo", *ALGORITHMS)
    return config


def test_tiny_recipe_and_variants_run_stop_resume_and_train(tmp_path):
    config = variants_run_config()
    configuration.resolve(config)
    workdir = str(tmp_path)
    assert not trainer.run(config, workdir, stop=StopAfter(1))["finished"]
    assert os.listdir(os.path.join(workdir, "checkpoints", "grpo")) == ["1"]
    assert trainer.run(config, workdir)["finished"]
    with open(os.path.join(workdir, "progress.json")) as f:
        assert json.load(f)["completed"] == {"grpo": 2, **{name: 1 for name in ALGORITHMS}}
    train = [r for r in read_metrics(workdir) if "train/loss" in r]
    # Step 1 ran before the stop; the resumed run continued at step 2 (nothing repeated).
    steps = [("grpo", 1), ("grpo", 2), *((name, 1) for name in ALGORITHMS)]
    assert [(r["train/stage"], r["train/stage_step"]) for r in train] == steps
    assert [r["eval/stage"] for r in read_metrics(workdir) if "eval/accuracy" in r] == list(config.stage_order)
    assert os.path.isfile(os.path.join(workdir, "final_model", "config.json"))
    # The plain stage: pi_old is the sampler's, measured at the first update; no correction.
    plain = train[1]
    assert plain["train/mismatch/tokens"] > 0 and plain["train/mismatch/logp_abs_max"] < 1e-4
    assert not any(k.startswith("train/sampler_correction/") for k in plain)

    rows = {r["train/stage"]: r for r in train[2:]}
    for name, row in rows.items():
        assert row["train/update_skipped"] == 0, name
        assert row["train/updates"] == 4, name  # 4 mini-batches of one rollout batch
        # The tiny model in float32: the sampler's and the trainer's log-probs agree to rounding, so every
        # correction's weight is ~1 and drops nothing.
        assert row["train/mismatch/tokens"] > 0, name
        assert row["train/mismatch/logp_abs_max"] < 1e-4, name
        assert row["train/mismatch/ratio_outside_fraction"] == 0, name
        assert abs(row["train/sampler_correction/weight_mean"] - 1) < 1e-3, name
        assert row["train/sampler_correction/zeroed_fraction"] == 0, name
        # Off-policy updates: after the first of the 4 updates the ratio moves away from 1.
        assert row["train/ratio_max"] > 1 + 1e-6 or row["train/ratio_min"] < 1 - 1e-6, name
    assert 0 <= rows["cispo"]["train/cispo_capped_fraction"] <= 1
    assert 0 < rows["sapo"]["train/sapo_gate_mean"] <= 1
    dapo = rows["dapo"]
    assert dapo["train/rewards/soft_overlong/mean"] <= 0
    assert dapo["train/dynamic_sampling/rounds"] >= 1
    assert dapo["train/dynamic_sampling/groups_kept"] + dapo["train/dynamic_sampling/groups_filled"] == 2
    assert dapo["train/dynamic_sampling/groups_sampled"] == 2 * dapo["train/dynamic_sampling/rounds"]
