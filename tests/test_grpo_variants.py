"""configs/grpo.py's algorithm variants (dapo, cispo, sapo, gspo): each full-size variant carries its source's
settings, and each `<name>_tiny` variant trains on the gym through the trainer, with the trainer's log-probs as pi_old
and one of the four sampler corrections switched on (one run, one stage per variant, to compile and evaluate the
tiny model once per variant only)."""

from __future__ import annotations

import pytest

from jaxvlm import configuration, rewards, trainer
from jaxvlm.metrics import read_metrics
from test_recipes import load_config

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
    """The tiny variants as the stages of one run, one step each, pi_old recomputed, a correction each."""
    config = load_config("grpo", "tiny")
    for name in ALGORITHMS:
        s = load_config("grpo", f"{name}_tiny").stages.grpo
        s.steps, s.epochs = 1, 0
        s.sampling.max_new_tokens = 16
        s.rewards = [*s.rewards, SIGNAL]
        s.loss.update(old_logp="recompute", sampler_correction=CORRECTIONS[name])
        config.stages[name] = s
    del config.stages["grpo"]
    config.stage_order = ALGORITHMS
    config.eval.num_examples = config.eval.batch_size = 4
    config.eval.sampling.max_new_tokens = 8
    config.train.update(save_every=1, progress=False)
    return config


def test_tiny_variants_train_with_the_trainer(tmp_path):
    config = variants_run_config()
    configuration.resolve(config)
    assert trainer.run(config, str(tmp_path))["finished"]
    rows = {r["train/stage"]: r for r in read_metrics(str(tmp_path)) if "train/loss" in r}
    assert set(rows) == set(ALGORITHMS)
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
