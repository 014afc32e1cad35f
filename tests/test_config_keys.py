"""No silently ignored config key: every leaf of every recipe config (and every `:variant`) is read by the run or
rejected at start-up, and a derived value set to disagree with its source is a start-up error naming both keys.

"Read" is tested by effect: `configuration.resolve` turns a config into the frozen `RunSpec` that is all the run
reads, so a leaf is read when changing it changes the spec, and rejected when the change raises a ConfigError."""

from __future__ import annotations

import copy
import importlib.util
import os

import ml_collections
import pytest

from jaxvlm import configuration, stages
from jaxvlm.configuration import gym_source, stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("demo", "sft", "grpo", "dyme", "curr_reft", "clgrpo", "infi_mmr", "eval")


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"keys_config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_configs():
    for name in RECIPES:
        for variant in load_module(name).VARIANTS:
            yield pytest.param(name, variant, id=f"{name}:{variant}" if variant else name)


def runnable(name: str, variant: str) -> ml_collections.ConfigDict:
    """The config as a user runs it: the full-size variants with a checkpoint path (they have no preset)."""
    c = load_module(name).get_config(variant)
    if not c.model.preset:
        c.model.path = "/path/to/checkpoint"
    return c


def leaves(section: ml_collections.ConfigDict, prefix: tuple[str, ...] = ()):
    """(path, value, field type) of every leaf; lists and tuples (sources, rewards, mesh shape) are leaves."""
    for key in section.keys():
        value = section[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value, section.get_ref(key).get_type()


def perturbed(value, field_type):
    """Another value of the same type (one that may be invalid: then the run must reject it)."""
    if value is None:
        return 12345.5 if field_type is float else 12345
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return value * 2 + 0.25
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return type(value)(value[:-1]) if value else type(value)(["^visual/"])
    raise TypeError(f"no perturbation for {value!r}")


def with_value(config: ml_collections.ConfigDict, path: tuple[str, ...], value) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    section = c
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    return c


def ignored_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The leaves of `config` whose change neither changes the resolved spec nor is rejected."""
    spec = configuration.resolve(config)
    assert configuration.resolve(copy.deepcopy(config)) == spec  # the spec is a value: equal configs, equal specs
    ignored = []
    for path, value, field_type in leaves(config):
        changed = with_value(config, path, perturbed(value, field_type))
        try:
            other = configuration.resolve(changed)
        except (configuration.ConfigError, ValueError, TypeError, KeyError):
            continue  # rejected, at start-up
        if other == spec:
            ignored.append(".".join(path))
    return ignored


@pytest.mark.parametrize("name,variant", list(recipe_configs()))
def test_every_leaf_is_read_or_rejected(name, variant):
    assert ignored_keys(runnable(name, variant)) == []


def test_the_walk_finds_a_key_nothing_reads(monkeypatch):
    """A resolution that forgets a key (here: sampling's top_k, as if SamplingParams.from_config dropped it) is caught
    by the walk above; and a key a recipe file adds to a section with ConfigDict.update is rejected."""
    from jaxvlm.sampling import SamplingParams

    real = SamplingParams.from_config.__func__

    def forgetful(cls, section):
        return real(cls, {k: v for k, v in section.items() if k != "top_k"})

    monkeypatch.setattr(SamplingParams, "from_config", classmethod(forgetful))
    assert ignored_keys(runnable("grpo", "tiny")) == ["eval.sampling.top_k", "stages.grpo.sampling.top_k"]
    monkeypatch.undo()
    c = runnable("grpo", "tiny")
    c.stages.grpo.sampling.update(unused=3)
    with pytest.raises(configuration.ConfigError, match=r"config\.stages\.grpo\.sampling\.unused: not a key here"):
        configuration.resolve(c)


def rl_config(**loss) -> ml_collections.ConfigDict:
    c = configuration.base_config()
    c.stage_order = ("grpo",)
    c.stages.grpo = stage(
        "grpo",
        steps=3,
        data=dict(sources=[gym_source("train", 16)], batch_size=2),
        rewards=["accuracy"],
        sampling=dict(num_generations=4, temperature=0.9),
        batch=dict(mini_batches=2),
        loss=dict(num_iterations=2, **loss),
    )
    return c


def test_derived_loss_keys_may_only_repeat_their_source():
    spec = configuration.resolve(rl_config()).stage("grpo")
    assert spec.loss.temperature == 0.9 and spec.loss.group_size == 4
    assert configuration.resolve(rl_config(temperature=0.9, group_size=4)).stage("grpo") == spec
    with pytest.raises(configuration.ConfigError) as error:
        configuration.resolve(rl_config(temperature=0.7))
    assert str(error.value) == (
        "config.stages.grpo.loss.temperature: is derived from config.stages.grpo.sampling.temperature (= 0.9; greedy "
        "sampling, 0, scores at 1.0); got 0.7. Set config.stages.grpo.sampling.temperature instead, or leave "
        "config.stages.grpo.loss.temperature unset"
    )
    with pytest.raises(
        configuration.ConfigError,
        match=r"^config\.stages\.grpo\.loss\.group_size: is derived from "
        r"config\.stages\.grpo\.sampling\.num_generations \(= 4\); got 8",
    ):
        configuration.resolve(rl_config(group_size=8))


def test_total_steps_is_derived_from_the_stage_length():
    c = rl_config()
    spec = configuration.resolve(c).stage("grpo")
    mode = stages.get("grpo")
    assert stages.plan(mode, spec).optimizer.total_steps == 3 * 2 * 2  # steps x mini-batches x num_iterations
    c.stages.grpo.optimizer.total_steps = 12
    assert stages.plan(mode, configuration.resolve(c).stage("grpo")).optimizer.total_steps == 12
    c.stages.grpo.optimizer.total_steps = 100
    with pytest.raises(configuration.ConfigError) as error:
        stages.plan(mode, configuration.resolve(c).stage("grpo"))
    assert str(error.value) == (
        "config.stages.grpo.optimizer.total_steps: is derived from config.stages.grpo.steps / epochs (= 12 updates: "
        "3 steps x 4 updates per step); got 100. Leave it unset"
    )


def test_keys_a_mode_does_not_read_are_not_in_its_stage():
    sft, grpo, dyme, reject, evaluation = (
        stages.get(m).defaults() for m in ("sft", "grpo", "dyme", "rejection_sft", "eval")
    )
    assert "sampling" not in sft and "rewards" not in sft and "rejection" not in sft
    assert set(sft.loss.keys()) == {"sft_aggregation"} and "mini_batches" not in sft.batch
    assert "max_target_length" in sft.data and "max_target_length" not in grpo.data  # no targets in GRPO
    assert "max_target_length" not in dyme.data  # DyME's references have the rollouts' width
    assert not {"with_targets", "num_epochs", "shard_by_process", "keep_images"} & set(sft.data.keys())
    assert not any(k.startswith("dyme_") for k in grpo.loss.keys()) and "sft_aggregation" not in grpo.loss
    assert {"dyme_granularity", "dyme_sft_threshold", "dyme_correct_threshold"} <= set(dyme.loss.keys())
    assert "rejection" in reject and "temperature" not in reject.rejection  # sampling is the stage's sampling
    assert {"optimizer", "loss", "batch", "steps"}.isdisjoint(evaluation.keys())
    with pytest.raises(KeyError, match=r"stage\('sft'\): unknown key 'sampling'"):
        stage("sft", sampling=dict(temperature=0.5))


def test_model_preset_and_path_together_are_an_error():
    c = runnable("grpo", "tiny")
    c.model.path = "/ckpt"
    with pytest.raises(
        configuration.ConfigError,
        match=r"^config\.model\.preset: 'tiny' is set together with "
        r"config\.model\.path='/ckpt': give one",
    ):
        configuration.resolve(c)


def test_the_registry_maps_every_mode_to_its_module():
    assert set(stages.MODES) == {"sft", "grpo", "dyme", "rejection_sft", "eval"}
    for name, mode in stages.MODES.items():
        assert mode.name == name and stages.get(name) is mode
        assert mode.defaults().mode == name and (mode.step is not None) == mode.trains
    with pytest.raises(
        ValueError,
        match=r"stage mode must be one of \('sft', 'grpo', 'dyme', 'rejection_sft', "
        r"'eval'\), got 'ppo'",
    ):
        stages.get("ppo")
