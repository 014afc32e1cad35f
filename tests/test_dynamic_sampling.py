"""DAPO dynamic sampling (`jaxvlm.dynamic_sampling`, grpo stages): the host-side selection (kept / dropped /
surplus / filled groups, order, prompts re-padded, images following their rows), the sampling loop, the config
checks, and a tiny grpo stage that refills its batches, logs the counts and resumes exactly."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import batching, configuration, dynamic_sampling, losses, rewards, sampling, trainer
from jaxvlm.configuration import gym_source, stage
from jaxvlm.dynamic_sampling import DynamicSampling, Selection, ShortBatchError
from jaxvlm.metrics import read_metrics
from jaxvlm.rollouts import Rollouts
from jaxvlm.stages import base
from test_data_pipeline import make_example, make_pipeline

# ----------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------


def test_signal_is_the_complement_of_group_reward_stats_zero_std():
    rng = np.random.default_rng(0)
    for g in (2, 3, 4):
        totals = rng.integers(0, 2, size=12 * g).astype(np.float32)  # ties are common
        totals[rng.random(totals.shape) < 0.2] = np.nan  # NaN rows are ignored, as in the advantages
        signal = dynamic_sampling.signal_groups(totals, g)
        stats = losses.group_reward_stats(jnp.asarray(totals), g)
        assert float(stats["zero_std_fraction"]) == pytest.approx(1 - signal.mean())
        advantages = np.asarray(losses.group_advantages(jnp.asarray(totals), g)).reshape(-1, g)
        assert not np.any(advantages[~signal])  # a dropped group would have had no gradient
    assert dynamic_sampling.signal_groups([1, 1, np.nan, 2, 3, np.nan], 2).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="groups of 4"):
        dynamic_sampling.signal_groups(np.zeros(6), 4)


def counts(s: Selection) -> dict:
    return dict(rounds=s.rounds, sampled=s.sampled, kept=s.kept, dropped=s.dropped, surplus=s.surplus, filled=s.filled)


def test_first_signal_groups_are_kept_in_sampling_order():
    #                  round 0     round 1      round 2
    signal = np.array([0, 1, 0, 0, 1, 0, 1, 1, 1], bool)
    s = dynamic_sampling.select_groups(signal, 3, rounds=3)
    assert s.groups.tolist() == [1, 4, 6]  # the first three; 7 and 8 are surplus
    assert counts(s) == dict(rounds=3, sampled=9, kept=3, dropped=4, surplus=2, filled=0)
    assert not s.short
    assert s.metrics() == {
        "dynamic_sampling/rounds": 3.0,
        "dynamic_sampling/groups_sampled": 9.0,
        "dynamic_sampling/groups_kept": 3.0,
        "dynamic_sampling/groups_dropped": 4.0,
        "dynamic_sampling/groups_surplus": 2.0,
        "dynamic_sampling/groups_filled": 0.0,
    }


def test_a_short_batch_is_filled_with_the_first_dropped_groups():
    s = dynamic_sampling.select_groups(np.array([0, 0, 1, 0, 0, 0], bool), 3, rounds=2)
    assert s.groups.tolist() == [0, 1, 2]  # group 2 kept, groups 0 and 1 fill, in sampling order
    assert counts(s) == dict(rounds=2, sampled=6, kept=1, dropped=5, surplus=0, filled=2)
    assert s.short
    # Everything has a signal in round one: the step's own batch, unchanged.
    s = dynamic_sampling.select_groups(np.ones(4, bool), 4)
    assert s.groups.tolist() == [0, 1, 2, 3] and counts(s)["rounds"] == 1
    with pytest.raises(ValueError, match="fewer than batch_size"):
        dynamic_sampling.select_groups(np.ones(2, bool), 3)


def test_rows_of_groups():
    assert dynamic_sampling.group_rows(np.array([1, 3]), 3).tolist() == [3, 4, 5, 9, 10, 11]
    rows = {"completion_ids": np.arange(8).reshape(4, 2), "position_ids": np.arange(3 * 4 * 5).reshape(3, 4, 5)}
    taken = dynamic_sampling.take_rows(rows, np.array([2, 0]))
    assert taken["completion_ids"].tolist() == [[4, 5], [0, 1]]
    np.testing.assert_array_equal(taken["position_ids"], rows["position_ids"][:, [2, 0]])


def test_check_short_fills_with_a_warning_or_stops_naming_the_key(caplog):
    short = dynamic_sampling.select_groups(np.array([0, 1, 0, 0], bool), 2, rounds=2)
    key = "stages.grpo.dynamic_sampling"
    with caplog.at_level("WARNING"):
        dynamic_sampling.check_short(short, DynamicSampling(True, 2, "fill"), key, 2, exhausted=False)
    assert "filled with 1 groups of equal rewards" in caplog.text
    with pytest.raises(
        ShortBatchError,
        match=r"config.stages.grpo.dynamic_sampling: after config.stages.grpo.dynamic_sampling.max_rounds = 2 "
        r"sampled batches, only 1 of batch_size = 2 groups had rewards that differ \(3 of 4 groups sampled had "
        r"equal rewards\); raise config.stages.grpo.dynamic_sampling.max_rounds or set "
        r"config.stages.grpo.dynamic_sampling.on_short='fill'",
    ):
        dynamic_sampling.check_short(short, DynamicSampling(True, 2, "error"), key, 2, exhausted=False)
    with pytest.raises(ShortBatchError, match="the stage's data ran out after 2 sampled batches"):
        dynamic_sampling.check_short(short, DynamicSampling(True, 5, "error"), key, 2, exhausted=True)
    full = dynamic_sampling.select_groups(np.array([1, 1], bool), 2)
    dynamic_sampling.check_short(full, DynamicSampling(True, 1, "error"), key, 2, exhausted=False)


# ----------------------------------------------------------------------------------------------------------
# The sampling loop, with a fake sampler
# ----------------------------------------------------------------------------------------------------------


def fake_rollouts(totals, width: int = 4, g: int = 2, accuracy=None) -> Rollouts:
    r = len(totals)
    rows = {
        "prompt_ids": np.full((r, width), 7, np.int32),
        "prompt_mask": np.ones((r, width), np.int32),
        "completion_ids": np.zeros((r, 3), np.int32),
        "completion_mask": np.ones((r, 3), np.int32),
        "position_ids": np.tile(np.arange(width + 3, dtype=np.int32), (3, r, 1)),
        "old_logp": np.zeros((r, 3), np.float32),
    }
    totals = np.asarray(totals, np.float32)
    scores = rewards.RewardResult(totals[:, None], totals, ("r",), {"r": 1}, {"r": 0})
    accuracy = totals if accuracy is None else np.asarray(accuracy, np.float32)
    return Rollouts([""] * r, [{}] * r, scores, accuracy, rows, np.full(r, 3), np.zeros(r, bool))


def test_sample_rounds_draws_until_full_or_bounded_or_out_of_data():
    batches = iter([{"n": 1}, {"n": 2}, {"n": 3}])
    totals = {0: [1, 1, 0, 0], 1: [0, 1, 1, 1], 2: [0, 1, 2, 3], 3: [0, 1, 0, 1]}  # signal groups: 0, 1, 2, 2
    calls = []

    def sample(batch, r):
        calls.append((batch["n"], r))
        return fake_rollouts(totals[batch["n"]]), {"time/rollout_s": 1.0}

    def draw():
        return next(batches, None)

    rounds, exhausted = dynamic_sampling.sample_rounds(
        {"n": 0}, draw, sample, batch_size=2, group_size=2, max_rounds=10
    )
    assert calls == [(0, 0), (1, 1), (2, 2)] and not exhausted  # 0 + 1 + 2 >= 2 signal groups after round 3
    assert [r.signal.tolist() for r in rounds] == [[False, False], [True, False], [True, True]]
    calls.clear()
    rounds, exhausted = dynamic_sampling.sample_rounds(
        {"n": 0}, lambda: {"n": 0}, sample, batch_size=2, group_size=2, max_rounds=3
    )
    assert len(rounds) == 3 and not exhausted  # the bound
    rounds, exhausted = dynamic_sampling.sample_rounds(
        {"n": 0}, lambda: None, sample, batch_size=2, group_size=2, max_rounds=3
    )
    assert len(rounds) == 1 and exhausted


def test_the_accuracy_filter_keeps_groups_whose_accuracies_differ():
    """DAPO's rule (verl's metric=acc): a shaping reward makes the totals of every group differ, but only the groups
    whose accuracies differ are kept."""
    totals = [0.1, 0.3, 0.2, 0.5, 1.0, 0.9]  # all three groups differ in total reward
    accuracy = [0, 0, 0, 1, 1, 1]  # only group 1 (rows 2, 3) differs in accuracy

    def sample(batch, r):
        return fake_rollouts(totals, accuracy=accuracy), {"time/rollout_s": 1.0}

    by_reward, _ = dynamic_sampling.sample_rounds({}, lambda: None, sample, batch_size=3, group_size=2, max_rounds=1)
    assert by_reward[0].signal.tolist() == [True, True, True]
    by_accuracy, _ = dynamic_sampling.sample_rounds(
        {}, lambda: None, sample, batch_size=3, group_size=2, max_rounds=1, filter="accuracy"
    )
    assert by_accuracy[0].signal.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="filter must be one of"):
        dynamic_sampling.sample_rounds({}, lambda: None, sample, batch_size=3, group_size=2, max_rounds=1, filter="x")


def test_concat_rollouts_left_pads_prompts_to_the_widest_batch():
    a, b = fake_rollouts([0, 1], width=3), fake_rollouts([2, 2, 5, 6], width=5)
    b.scores.failures["r"] = 2
    merged = dynamic_sampling.concat_rollouts([a, b], pad_id=99)
    assert merged.rows["prompt_ids"].shape == (6, 5) and merged.rows["position_ids"].shape == (3, 6, 8)
    assert merged.rows["prompt_ids"][0].tolist() == [99, 99, 7, 7, 7]
    assert merged.rows["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert merged.rows["position_ids"][1, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]  # pads at 0, tokens unchanged
    np.testing.assert_array_equal(merged.rows["prompt_ids"][2:], b.rows["prompt_ids"])
    assert merged.scores.total.tolist() == [0, 1, 2, 2, 5, 6] and merged.scores.failures == {"r": 3}
    assert len(merged.completions) == len(merged.lengths) == 6


@pytest.mark.parametrize("widths", [(3, 5), (4, 4)])
def test_re_padded_prompts_give_the_same_sequences(widths):
    """Left padding changes no real token's column relative to the completion: the scored sequence (mask-selected
    ids and positions) is the same before and after."""
    outs = [fake_rollouts([0, 1], width=w) for w in widths]
    merged = dynamic_sampling.concat_rollouts(outs, pad_id=0)
    for i, out in enumerate(outs):
        for j in range(2):
            row = 2 * i + j
            real = merged.rows["prompt_mask"][row].astype(bool)
            assert merged.rows["prompt_ids"][row][real].tolist() == out.rows["prompt_ids"][j].tolist()
            t = merged.rows["prompt_ids"].shape[1]
            seq = merged.rows["position_ids"][0, row][np.concatenate([real, np.ones(3, bool)])]
            assert seq.tolist() == out.rows["position_ids"][0, j].tolist()
            assert merged.rows["position_ids"].shape[2] == t + 3


def test_images_follow_their_groups(tokenizer, model_config):
    """Two pipeline batches of different prompt widths (0-2 images per prompt); the chosen groups' rows carry their
    own prompt's images, shared by the group's G rows, and the micro-batches assemble from them."""
    g = 2
    first = [make_example(k, images=(1, 0)[k % 2]) for k in range(2)]
    second = [make_example(10 + k, images=(2, 1)[k % 2]) for k in range(2)]
    batches = [
        next(iter(make_pipeline([ex], tokenizer, model_config, shuffle=False, batch_size=2, prompt_buckets=(166, 512))))
        for ex in (first, second)
    ]
    outs = []
    for batch in batches:
        prompts = sampling.prepare_prompts(model_config, batch["prompts"])
        n = 3
        rollout = sampling.Rollout(
            tokens=np.ones((2 * g, n), np.int32),
            mask=np.ones((2 * g, n), np.int32),
            logprobs=np.zeros((2 * g, n), np.float32),
            lengths=np.full(2 * g, n),
            truncated=np.zeros(2 * g, bool),
            steps=np.int32(n),
        )
        rows = sampling.update_rows(prompts, rollout, g)
        outs.append(
            Rollouts(
                [""] * 4, [], fake_rollouts([0, 0, 0, 1]).scores, np.zeros(4), rows, rollout.lengths, rollout.truncated
            )
        )
    assert outs[0].rows["prompt_ids"].shape[1] != outs[1].rows["prompt_ids"].shape[1]
    merged = dynamic_sampling.concat_rollouts(outs, tokenizer.pad_token_id)
    per_round = [base.row_pixels(batch, g) for batch in batches]
    pixels = dynamic_sampling.concat_pixels(per_round, [4, 4])
    groups = np.array([1, 2])  # round 0's text-only prompt, round 1's two-image prompt
    index = dynamic_sampling.group_rows(groups, g)
    chosen = [pixels[i] for i in index]
    assert [len(grid) for _, grid in chosen] == [0, 0, 2, 2]
    assert chosen[2][0] is chosen[3][0] and chosen[2][0] is per_round[1][0][0]  # the group's one copy
    rows = dynamic_sampling.take_rows(merged.rows, index)
    for r, (batch_index, source_row) in enumerate([(0, 1), (0, 1), (1, 0), (1, 0)]):
        prompts = batches[batch_index]["prompts"]
        real = prompts["attention_mask"][source_row].astype(bool)
        assert rows["prompt_ids"][r][rows["prompt_mask"][r].astype(bool)].tolist() == (
            prompts["input_ids"][source_row][real].tolist()
        )
    mb = batching.microbatches(rows, (2,), row_pixels=chosen, vision_config=model_config.vision)
    assert mb["image_offset"].shape == (2, 2) and mb["pixel_values"].shape[0] == 2
    assert dynamic_sampling.concat_pixels([None, None], [4, 4]) is None


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def ds_config(**dynamic):
    c = configuration.base_config()
    c.model.preset = "tiny"
    c.stage_order = ("grpo",)
    c.stages.grpo = stage(
        "grpo",
        steps=1,
        data=dict(sources=[gym_source("train", 8)], batch_size=2),
        rewards=["format_think_answer", "accuracy"],
        sampling=dict(num_generations=2, max_new_tokens=8),
        dynamic_sampling=dynamic,
    )
    return c


def test_config_keys_are_checked_by_path():
    spec = configuration.resolve(ds_config(enabled=True, max_rounds=3, on_short="error")).stages[0]
    assert spec.dynamic_sampling == DynamicSampling(enabled=True, max_rounds=3, on_short="error")
    assert configuration.resolve(ds_config()).stages[0].dynamic_sampling == DynamicSampling()
    for values, match in [
        (dict(max_rounds=0), r"config.stages.grpo.dynamic_sampling.max_rounds: must be >= 1, got 0"),
        (dict(on_short="drop"), r"config.stages.grpo.dynamic_sampling.on_short: .*'fill', 'error'.*'drop'"),
        (dict(max_rounds=2**31), r"config.stages.grpo.dynamic_sampling.max_rounds: must be <= 2147483647"),
        (dict(filter="std"), r"config.stages.grpo.dynamic_sampling.filter: .*'reward', 'accuracy'.*'std'"),
    ]:
        with pytest.raises(configuration.ConfigError, match=match):
            configuration.resolve(ds_config(**values))
    assert configuration.resolve(ds_config(filter="accuracy")).stages[0].dynamic_sampling.filter == "accuracy"
    no_accuracy = ds_config(enabled=True, filter="accuracy")
    no_accuracy.stages.grpo.accuracy_reward = ""
    with pytest.raises(configuration.ConfigError, match=r"config.stages.grpo.dynamic_sampling.filter: 'accuracy' "):
        configuration.resolve(no_accuracy)


def test_a_dyme_stage_has_no_dynamic_sampling():
    c = ds_config()
    c.stages.dyme = stage(
        "dyme", steps=1, data=dict(sources=[gym_source("train", 8)], batch_size=2), rewards=["accuracy"]
    )
    c.stages.dyme.dynamic_sampling = dict(enabled=True)
    c.stage_order = ("dyme",)
    with pytest.raises(configuration.ConfigError, match=r"config.stages.dyme.dynamic_sampling: not a key here"):
        configuration.resolve(c)
    with pytest.raises(KeyError, match="unknown key 'dynamic_sampling'"):
        stage("dyme", dynamic_sampling=dict(enabled=True))


# ----------------------------------------------------------------------------------------------------------
# A tiny grpo stage
# ----------------------------------------------------------------------------------------------------------


def split_reward(completion: str, example, *, completion_length: int) -> float:
    """The same reward for every rollout of an `exists` prompt (no signal); otherwise a hash of the completion (a
    signal, unless the G completions coincide). Takes the token lengths to check they reach the rewards."""
    assert completion_length >= 1
    if example["task"] == "exists":
        return 1.0
    return (zlib.crc32(completion.encode()) % 1000) / 1000.0


TASKS = ("exists", "count")


def run_config(steps: int = 3, **dynamic):
    c = configuration.base_config()
    c.mesh.shape = (1, 1, 1)
    c.train.update(save_every=1, progress=False)
    c.eval.update(sources=[gym_source("validation", 4, tasks=TASKS)], num_examples=2, batch_size=2)
    c.eval.sampling.max_new_tokens = 4
    c.stage_order = ("grpo",)
    c.stages.grpo = stage(
        "grpo",
        steps=steps,
        data=dict(
            sources=[gym_source("train", 32, tasks=TASKS)],
            batch_size=2,
            max_prompt_length=256,
            prompt_buckets=(256,),  # one prompt width: one compilation (tests above re-pad mixed widths)
            on_error="skip",
            prefetch=0,
            num_threads=1,
        ),
        rewards=["split_reward", {"name": "soft_overlong", "weight": 0.0, "kwargs": {"soft_punish_cache": 4}}],
        accuracy_reward="",
        sampling=dict(num_generations=2, max_new_tokens=8),
        optimizer=dict(learning_rate=1e-3, weight_decay=0.0),
        dynamic_sampling=dict(enabled=True, max_rounds=3, **dynamic),
    )
    return c


@pytest.fixture
def split_rewards(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "split_reward", split_reward)


def train_rows(workdir) -> list[dict]:
    return [r for r in read_metrics(str(workdir)) if "train/loss" in r]


DS = ("rounds", "groups_sampled", "groups_kept", "groups_dropped", "groups_surplus", "groups_filled")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rewards.REWARDS, "split_reward", split_reward)
        workdir = tmp_path_factory.mktemp("whole")
        assert trainer.run(run_config(), str(workdir))["finished"]
    return workdir


@pytest.mark.slow  # trains (a few seconds of a tiny model)
def test_grpo_stage_refills_its_batch_and_logs_the_counts(whole_run):
    rows = train_rows(whole_run)
    assert len(rows) == 3
    got = [tuple(int(r[f"train/dynamic_sampling/{k}"]) for k in DS) for r in rows]
    for rounds, sampled, kept, dropped, surplus, filled in got:
        assert sampled == 2 * rounds and sampled == kept + dropped + surplus and kept + filled == 2
    # Step 1: three batches, every group an `exists` one: filled. Step 2: a full first batch. Step 3: one group
    # short, refilled from a second batch, whose second signal group is surplus.
    assert got == [(3, 6, 0, 6, 0, 2), (1, 2, 2, 0, 0, 0), (2, 4, 2, 1, 1, 0)]
    for r, (_, sampled, _, dropped, _, _) in zip(rows, got):
        # Rollout metrics are over every sampled rollout; the batch's own reward is apart.
        assert r["train/frac_reward_zero_std"] == pytest.approx(dropped / sampled)
        assert r["train/rewards/soft_overlong/failures"] == 0  # the token lengths reached the reward
        assert -1 <= r["train/rewards/soft_overlong/mean"] <= 0
    assert rows[0]["train/advantage_abs_max"] == 0 and rows[0]["train/dynamic_sampling/batch_reward"] == 1.0
    assert rows[2]["train/advantage_abs_max"] > 0


@pytest.mark.slow  # trains
def test_stop_and_resume_equals_the_uninterrupted_run(whole_run, tmp_path, split_rewards):
    from test_trainer import StopAfter

    assert not trainer.run(run_config(), str(tmp_path), stop=StopAfter(1))["finished"]  # after step 1: 3 draws
    assert trainer.run(run_config(), str(tmp_path))["finished"]
    whole, parts = train_rows(whole_run), train_rows(tmp_path)
    assert len(parts) == 3
    for a, b in zip(whole, parts):
        for k in DS:
            assert a[f"train/dynamic_sampling/{k}"] == b[f"train/dynamic_sampling/{k}"]
        assert a["train/reward"] == b["train/reward"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow  # trains
def test_on_short_error_stops_naming_the_key(tmp_path, split_rewards):
    with pytest.raises(ShortBatchError, match=r"config.stages.grpo.dynamic_sampling: after .*max_rounds = 3 .*"):
        trainer.run(run_config(steps=1, on_short="error"), str(tmp_path))
