"""DAPO's soft overlong punishment (`rewards.soft_overlong`, eq. 13) on token counts: the formula at and around its
boundaries, TRL's implementation where installed, and the token lengths reaching it through `compute_rewards` and
the stage config (L_max derived from `sampling.max_new_tokens`)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxvlm import configuration, rewards
from jaxvlm.configuration import gym_source, stage


def reference(length: int, max_len: int, cache: int) -> float:
    """DAPO eq. 13 in float64, written from the paper."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return float(np.float64(max_len - cache - length) / np.float64(cache))
    return -1.0


def score(lengths, max_len: int, cache: int) -> np.ndarray:
    spec = {"name": "soft_overlong", "kwargs": {"max_completion_len": max_len, "soft_punish_cache": cache}}
    result = rewards.compute_rewards([spec], [""] * len(lengths), [{}] * len(lengths), lengths=lengths)
    assert result.failures == {"soft_overlong": 0}
    return result.per_reward[:, 0]


@pytest.mark.parametrize("max_len, cache", [(10, 4), (20, 20), (7, 1), (12, 0)])
def test_formula_at_every_length_and_boundary(max_len, cache):
    lengths = list(range(0, max_len + 4))
    expected = [reference(n, max_len, cache) for n in lengths]
    np.testing.assert_allclose(score(lengths, max_len, cache), expected, rtol=0, atol=1e-7)


def test_boundaries_by_hand():
    # L_max 10, L_cache 4: free up to 6 tokens, a linear ramp to -1 at 10 tokens, -1 beyond.
    got = score([5, 6, 7, 8, 9, 10, 11, 100], 10, 4)
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -0.75, -1, -1, -1], atol=1e-7)
    # L_cache 0: a hard cut, no ramp (and no division by zero).
    np.testing.assert_array_equal(score([9, 10, 11], 10, 0), [0, 0, -1])


def test_matches_trl():
    trl_rewards = pytest.importorskip("trl.rewards")
    for max_len, cache in [(10, 4), (16, 16), (9, 0), (100, 20)]:
        fn = trl_rewards.get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)
        lengths = list(range(0, max_len + 3))
        expected = fn([[1] * n for n in lengths])
        np.testing.assert_allclose(score(lengths, max_len, cache), expected, rtol=0, atol=1e-7)


def test_token_lengths_are_required_and_not_settable():
    spec = {"name": "soft_overlong", "kwargs": {"max_completion_len": 8, "soft_punish_cache": 2}}
    with pytest.raises(ValueError, match=r"rewards \['soft_overlong'\] score the completions' token counts"):
        rewards.compute_rewards([spec], ["a"], [{}])
    with pytest.raises(ValueError, match="1 completions but 2 lengths"):
        rewards.compute_rewards([spec], ["a"], [{}], lengths=[1, 2])
    bad = {"name": "soft_overlong", "kwargs": {"max_completion_len": 8, "soft_punish_cache": 2, "completion_length": 3}}
    with pytest.raises(ValueError, match="'completion_length'.* given by the sampler"):
        rewards.parse_reward_specs([bad])
    # Other rewards do not read the lengths and score as before with or without them.
    with_lengths = rewards.compute_rewards(["format_dyme"], ["Answer: 3"], [{}], lengths=[4])
    assert (
        with_lengths.per_reward.tolist()
        == rewards.compute_rewards(["format_dyme"], ["Answer: 3"], [{}]).per_reward.tolist()
    )


def test_settings_are_checked():
    def parse(kwargs, max_new_tokens=None):
        return rewards.parse_reward_specs([{"name": "soft_overlong", "kwargs": kwargs}], max_new_tokens=max_new_tokens)

    assert parse({"soft_punish_cache": 4}, max_new_tokens=32)[0].kwargs == {
        "soft_punish_cache": 4,
        "max_completion_len": 32,
    }
    assert (
        parse({"soft_punish_cache": 4, "max_completion_len": 20}, max_new_tokens=32)[0].kwargs["max_completion_len"]
        == 20
    )
    with pytest.raises(ValueError, match="missing a required argument: 'soft_punish_cache'"):
        parse({}, max_new_tokens=32)
    with pytest.raises(ValueError, match="missing a required argument: 'max_completion_len'"):
        parse({"soft_punish_cache": 4})  # no stage to take it from
    with pytest.raises(
        ValueError, match="max_completion_len'\\] = 40 is above the stage's sampling.max_new_tokens = 32"
    ):
        parse({"soft_punish_cache": 4, "max_completion_len": 40}, max_new_tokens=32)
    with pytest.raises(
        ValueError, match=r"soft_punish_cache \(tokens, at most max_completion_len\) must be in \[0, 32\]"
    ):
        parse({"soft_punish_cache": 33}, max_new_tokens=32)
    with pytest.raises(ValueError, match="soft_punish_cache .* must be an integer"):
        parse({"soft_punish_cache": 2.5}, max_new_tokens=32)
    with pytest.raises(
        ValueError, match=r"reward entry .*: soft_overlong: max_completion_len \(tokens\) must be >= 1, got 0"
    ):
        parse({"soft_punish_cache": 0, "max_completion_len": 0})


def grpo_config(reward):
    c = configuration.base_config()
    c.model.preset = "tiny"
    c.stage_order = ("grpo",)
    c.stages.grpo = stage(
        "grpo",
        steps=1,
        data=dict(sources=[gym_source("train", 8)], batch_size=2),
        rewards=["format_think_answer", reward],
        accuracy_reward="",
        sampling=dict(num_generations=2, max_new_tokens=24),
    )
    return c


def test_stage_derives_max_completion_len_from_its_sampling():
    spec = configuration.resolve(grpo_config({"name": "soft_overlong", "kwargs": {"soft_punish_cache": 8}}))
    assert spec.stages[0].rewards[1].kwargs == {"soft_punish_cache": 8, "max_completion_len": 24}
    too_long = {"name": "soft_overlong", "kwargs": {"soft_punish_cache": 8, "max_completion_len": 25}}
    with pytest.raises(configuration.ConfigError, match=r"config.stages.grpo.rewards: .*above the stage's sampling"):
        configuration.resolve(grpo_config(too_long))
