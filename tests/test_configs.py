"""The recipe configs (`configs/<recipe>.py`): every variant builds and passes `check_config`, each recipe has the
shape its paper describes (docs/methods.md), the tiny variants fit the gym on a CPU, and command-line overrides are
checked by ml_collections the way `jaxvlm/main.py` parses them."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from jaxvlm import configuration, rewards, stages
from jaxvlm.data.gym import TASK_STAGE, TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("sft", "grpo", "dyme", "curr_reft", "clgrpo", "infi_mmr")
VARIANTS = ("", "tiny")
STAGE_NAMES = {
    "sft": ("sft",),
    "grpo": ("grpo",),
    "dyme": ("dyme",),
    "curr_reft": ("judge", "choice", "open", "reject"),
    "clgrpo": ("sft", "format", "accuracy", "cliplow"),
    "infi_mmr": ("text", "caption", "caption_free"),
}


def config_path(recipe: str) -> str:
    return os.path.join(ROOT, "configs", f"{recipe}.py")


def load_recipe(recipe: str):
    spec = importlib.util.spec_from_file_location(f"recipe_config_{recipe}", config_path(recipe))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(recipe: str, variant: str | None = None):
    return load_recipe(recipe).get_config(variant)


def all_sources(c) -> list[tuple[str, dict]]:
    """(where, entry) of every data source a config reads: stages, rejection text sources, eval."""
    out = []
    for name in c.stage_order:
        s = c.stages[name]
        out += [(f"stages.{name}.data.sources[{k}]", dict(e)) for k, e in enumerate(s.data.sources)]
        if "rejection" in s:
            out += [
                (f"stages.{name}.rejection.text_sources[{k}]", dict(e)) for k, e in enumerate(s.rejection.text_sources)
            ]
    out += [(f"eval.sources[{k}]", dict(e)) for k, e in enumerate(c.eval.sources)]
    return out


def reward_names(s) -> list[str]:
    return [spec.name for spec in rewards.parse_reward_specs(list(s.rewards))]


def reward_kwargs(s, name: str) -> dict:
    (spec,) = [spec for spec in rewards.parse_reward_specs(list(s.rewards)) if spec.name == name]
    return dict(spec.kwargs)


def tasks_of(s) -> set[str]:
    tasks = set()
    for entry in s.data.sources:
        assert entry["kind"] == "gym"
        tasks |= set(entry.get("tasks", TASKS))
    return tasks


# ----------------------------------------------------------------------------------------------------------
# Every recipe and variant
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [None, *VARIANTS])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_variant_builds_and_passes_check_config(recipe, variant):
    c = get_config(recipe, variant)
    if not c.model.preset:  # the full-size variants train a checkpoint the user names, checked at start-up
        with pytest.raises(configuration.ConfigError, match=r"config\.model\.path: this config trains a real"):
            configuration.check_config(c)
        c.model.path = "/ckpt"
    configuration.check_config(c)
    assert tuple(c.stage_order) == STAGE_NAMES[recipe]
    assert set(c.stage_order) <= set(c.stages.keys())
    for name in c.stage_order:
        assert c.stages[name].mode in stages.MODES
    assert c.eval.sources and c.eval.num_examples >= c.eval.batch_size


@pytest.mark.parametrize("recipe", RECIPES)
def test_default_variant_is_the_full_size_recipe_with_placeholders(recipe):
    c = get_config(recipe)
    assert get_config(recipe, "").to_dict() == c.to_dict()
    assert c.model.path == ""  # set by the user: --config.model.path=/path/to/checkpoint
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32"
    for where, entry in all_sources(c):
        assert entry["kind"] == "jsonl", where
        assert entry["path"].startswith("/path/to/"), where  # a placeholder, documented in the config
        assert set(entry) <= {"kind", "path", "record_format", "answer_type", "image_root", "weight"}, where


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_variant_runs_on_the_gym_with_the_tiny_model(recipe):
    c = get_config(recipe, "tiny")
    assert c.model.preset == "tiny" and c.model.path == ""
    assert tuple(c.mesh.shape) == (1, 1, 1)
    assert c.eval.batch_size == 8 and 8 <= c.eval.num_examples <= 16 and c.eval.sampling.max_new_tokens <= 48
    assert c.train.save_every <= 4
    for where, entry in all_sources(c):
        assert entry["kind"] == "gym", where
    for name in c.stage_order:
        s = c.stages[name]
        assert 1 <= s.steps <= 4 and s.epochs == 0, name
        assert 2 <= s.data.batch_size <= 4, name
        assert s.data.on_error == "skip", name
        assert s.data.max_prompt_length >= 192, name
        if s.mode in ("grpo", "dyme"):
            assert 2 <= s.sampling.num_generations <= 4, name
            assert s.sampling.max_new_tokens <= (96 if s.mode == "dyme" else 48), name
        if s.mode in ("sft", "rejection_sft"):
            assert s.data.max_target_length >= 160, name


@pytest.mark.parametrize("recipe", RECIPES)
def test_unknown_variant_raises_listing_the_variants(recipe):
    with pytest.raises(ValueError, match=r"unknown variant 'huge'.*'tiny'"):
        get_config(recipe, "huge")


def test_frozen_vision_pattern_matches_exactly_the_vision_tower():
    import jax

    from jaxvlm import models
    from jaxvlm.train_steps import trainable_mask

    params = models.init_params(models.preset("tiny"), 0)
    frozen = get_config("dyme").stages.dyme.optimizer.frozen
    mask = trainable_mask(params, tuple(frozen))
    assert not any(jax.tree.leaves(mask["visual"]))
    assert all(jax.tree.leaves(mask["language_model"]))


# ----------------------------------------------------------------------------------------------------------
# Recipe facts (docs/methods.md)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_dyme_is_one_dyme_stage_without_kl(variant):
    c = get_config("dyme", variant)
    s = c.stages.dyme
    assert s.mode == "dyme"
    assert s.loss.beta == 0.0 and s.loss.num_iterations == 1 and s.loss.aggregation == "grpo"
    assert s.loss.dyme_granularity == "prompt"
    assert s.data.prompt_style == "dyme"
    assert reward_names(s) == ["format_dyme", "think_f1", "accuracy"]
    assert all(spec.weight == 1.0 for spec in rewards.parse_reward_specs(list(s.rewards)))
    assert reward_kwargs(s, "think_f1")["extract"] == "dyme" and reward_kwargs(s, "accuracy")["extract"] == "dyme"
    assert s.accuracy_reward == "accuracy"
    assert tuple(s.optimizer.frozen) == ("^visual/",)
    if variant == "":  # DyME config.py (docs/methods.md §2.6)
        assert s.sampling.num_generations == 8 and s.sampling.max_new_tokens == 300
        assert s.optimizer.learning_rate == 8e-5 and s.optimizer.weight_decay == 0.01
        assert s.optimizer.warmup_steps == 0 and s.optimizer.max_grad_norm == 1.0
        assert s.epochs == 10 and s.steps == 0
        assert s.data.batch_size == 32  # 32 prompts x G 8 = 256 completions per optimizer step
        assert s.batch.mini_batches == 1


def test_dyme_tiny_references_fit_the_rollout_width(tiny_encoder):
    """DyME's memorisation rows use the reference as a rollout: it must fit sampling.max_new_tokens."""
    c = get_config("dyme", "tiny")
    s = c.stages.dyme
    too_long = tiny_encoder.too_long(s, with_targets=True, target_width=s.sampling.max_new_tokens)
    assert too_long == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_curr_reft_curriculum_then_rejection_sft(variant):
    c = get_config("curr_reft", variant)
    judge, choice, open_, reject = (c.stages[n] for n in ("judge", "choice", "open", "reject"))
    for s in (judge, choice, open_):
        assert s.mode == "grpo"
        assert s.loss.beta == 0.04 and s.loss.kl_estimator == "k3"
        assert s.loss.num_iterations == 1 and s.batch.mini_batches == 1
        assert s.sampling.temperature == 1.0
        assert s.data.prompt_style == "r1"
        assert reward_names(s) == ["format_think_answer", "accuracy"]
        assert tuple(s.optimizer.frozen) == ()  # the whole model is trained
    assert reject.mode == "rejection_sft"
    assert reward_names(reject) == ["format_think_answer", "accuracy"]
    assert reject.rejection.text_share > 0 and reject.rejection.text_sources
    if variant == "tiny":  # yes/no -> choice -> open, by the gym's TASK_STAGE
        assert tasks_of(judge) == {"exists"}
        assert tasks_of(choice) == {"count_choice", "colors_present"}
        assert tasks_of(open_) == {t for t, k in TASK_STAGE.items() if k == 3}
        assert tasks_of(reject) == tasks_of(open_)
        text = reject.rejection.text_sources
        assert [tuple(e["tasks"]) for e in text] == [("word_arithmetic",)]
    else:  # answer types by stage, and the 3B launch scripts' numbers (docs/methods.md §3)
        answer_types = [{e["answer_type"] for e in s.data.sources} for s in (judge, choice, open_)]
        assert answer_types == [{"yesno"}, {"choice", "multi_choice"}, {"math", "bbox", "labels"}]
        assert [s.sampling.num_generations for s in (judge, choice, open_)] == [4, 2, 4]
        assert all(
            s.sampling.max_new_tokens == 256 and s.optimizer.learning_rate == 1e-6 for s in (judge, choice, open_)
        )
        assert all(
            "math_math_test" not in e["path"] for s in (judge, choice, open_, reject) for e in s.data.sources
        )  # the test set stays out of training (docs/methods.md §3.6)
        assert reject.optimizer.learning_rate == 2e-7 and reject.epochs == 3
        assert reject.rejection.min_reward == 2.0  # full format + accuracy reward


@pytest.mark.parametrize("variant", VARIANTS)
def test_clgrpo_four_incremental_stages_with_cliplow_last(variant):
    c = get_config("clgrpo", variant)
    sft, fmt, acc, cliplow = (c.stages[n] for n in ("sft", "format", "accuracy", "cliplow"))
    assert [s.mode for s in (sft, fmt, acc, cliplow)] == ["sft", "grpo", "grpo", "grpo"]
    assert reward_names(fmt) == ["format_think_answer"]
    assert reward_names(acc) == ["format_think_answer", "accuracy"]
    assert reward_names(cliplow) == reward_names(acc)
    for s in (fmt, acc):
        assert s.loss.eps_low == s.loss.eps_high
    assert cliplow.loss.eps_low < cliplow.loss.eps_high
    # More than one update per rollout batch, or the clip never binds.
    assert cliplow.loss.num_iterations > 1
    assert cliplow.batch.mini_batches * cliplow.loss.num_iterations > 1
    if variant == "tiny":
        assert "mood" in tasks_of(sft) and all("mood" in tasks_of(s) for s in (fmt, acc, cliplow))


@pytest.mark.parametrize("variant", VARIANTS)
def test_infi_mmr_text_then_captioned_then_caption_free(variant):
    c = get_config("infi_mmr", variant)
    text, caption, free = (c.stages[n] for n in ("text", "caption", "caption_free"))
    for s in (text, caption, free):
        assert s.mode == "grpo" and s.loss.beta > 0
        assert reward_names(s) == ["format_think_answer", "accuracy"]
    assert not text.data.with_caption and caption.data.with_caption and not free.data.with_caption
    assert [dict(e) for e in caption.data.sources] == [dict(e) for e in free.data.sources]
    if variant == "tiny":
        assert tasks_of(text) == {"word_arithmetic"}  # text-only sources only
        assert all(TASK_STAGE[t] > 0 for t in tasks_of(caption))  # multimodal tasks


@pytest.mark.parametrize("variant", VARIANTS)
def test_sft_and_grpo_baselines(variant):
    s = get_config("sft", variant).stages.sft
    assert s.mode == "sft" and s.data.prompt_style == "r1"
    g = get_config("grpo", variant).stages.grpo
    assert g.mode == "grpo" and g.data.prompt_style == "r1"
    assert g.loss.beta == 0.04 and g.loss.aggregation == "grpo"
    assert reward_names(g) == ["format_think_answer", "accuracy"]


# ----------------------------------------------------------------------------------------------------------
# The tiny variants' gym prompts and targets fit their limits (on_error="skip" should almost never fire)
# ----------------------------------------------------------------------------------------------------------


class TinyEncoder:
    def __init__(self, tokenizer):
        from jaxvlm import models
        from jaxvlm.processing.image import ImageProcessor

        self.tokenizer = tokenizer
        vc = models.preset("tiny").vision
        self.image_processor = ImageProcessor(
            min_pixels=56 * 56,
            max_pixels=56 * 56,
            patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size,
        )

    def too_long(
        self, s, *, with_targets: bool, target_width: int | None = None, limit: int = 48, source_entries=None
    ) -> int:
        """Records of the stage's gym sources (or `source_entries`; the first `limit` of each) that exceed the
        stage's lengths."""
        from jaxvlm.data import pipeline, sources
        from jaxvlm.data.jsonl import DataError

        values = {k: v for k, v in s.data.to_dict().items() if k != "sources"}
        values.update(with_targets=with_targets, on_error="raise")
        if target_width is not None:
            values["max_target_length"] = target_width
        encoder = pipeline.ExampleEncoder(
            self.tokenizer, self.image_processor, pipeline.PipelineConfig.from_dict(values)
        )
        count = 0
        for entry in s.data.sources if source_entries is None else source_entries:
            source = sources.make_source(dict(entry))
            for i in range(min(limit, len(source))):
                try:
                    encoder.encode(source[i])
                except DataError as error:
                    assert error.kind == "too_long", str(error)
                    count += 1
        return count


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from jaxvlm.tokenizer import builtin_tokenizer

    return TinyEncoder(builtin_tokenizer(str(tmp_path_factory.mktemp("tokenizer"))))


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_prompts_and_sft_targets_fit(recipe, tiny_encoder):
    c = get_config(recipe, "tiny")
    for name in c.stage_order:
        s = c.stages[name]
        if s.mode == "dyme":
            continue  # test_dyme_tiny_references_fit_the_rollout_width
        assert tiny_encoder.too_long(s, with_targets=s.mode == "sft") == 0, name
        if s.mode == "rejection_sft":  # the text-only examples mixed into its SFT set are trained on their targets
            assert tiny_encoder.too_long(s, with_targets=True, source_entries=s.rejection.text_sources) == 0, name


# ----------------------------------------------------------------------------------------------------------
# Command-line overrides, parsed as jaxvlm/main.py parses them
# ----------------------------------------------------------------------------------------------------------


def parse_command_line(monkeypatch, *args: str):
    """Parse `prog --config ... <args>` with a fresh FlagValues and DEFINE_config_file(lock_config=True), as main.py
    does; config_flags reads the overrides from sys.argv, so that is patched too. Returns the config."""
    argv = ["prog", *args]
    monkeypatch.setattr(sys, "argv", argv)
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "Path to a config file.", flag_values=flag_values, lock_config=True
    )
    flag_values(argv)
    return holder.value


def test_command_line_good_overrides_change_the_values(monkeypatch):
    c = parse_command_line(
        monkeypatch,
        "--config",
        f"{config_path('clgrpo')}:tiny",
        "--config.stages.cliplow.loss.eps_low=0.05",
        "--config.stages.format.steps=2",
        "--config.stages.sft.data.sources[0].num_examples=32",
        "--config.model.preset=",
        "--config.model.path=/ckpt",
    )
    assert c.stages.cliplow.loss.eps_low == 0.05 and c.stages.format.steps == 2
    assert c.stages.sft.data.sources[0]["num_examples"] == 32 and c.model.path == "/ckpt"
    configuration.check_config(c)
    # The placeholder paths of the default variants are replaced element by element (a list cannot be overridden).
    c = parse_command_line(
        monkeypatch, "--config", config_path("dyme"), "--config.stages.dyme.data.sources[0].path=/data/train.jsonl"
    )
    assert c.stages.dyme.data.sources[0]["path"] == "/data/train.jsonl"
    assert c.stages.dyme.sampling.num_generations == 8  # the default variant


@pytest.mark.parametrize(
    "recipe,override",
    [
        ("dyme", "--config.stages.dyme.loss.eps_lw=0.1"),
        ("clgrpo", "--config.stages.cliplow.loss.eps_lw=0.1"),
        ("curr_reft", "--config.stages.judge.sampling.num_generation=4"),
        ("infi_mmr", "--config.stages.caption.data.with_captions=True"),
    ],
)
def test_command_line_misspelt_key_fails_naming_it(monkeypatch, recipe, override):
    key = override.split("=")[0].rsplit(".", 1)[1]
    with pytest.raises((AttributeError, KeyError, flags.Error)) as error:
        parse_command_line(monkeypatch, "--config", f"{config_path(recipe)}:tiny", override)
    assert key in str(error.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("--config.stages.dyme.steps=abc", "stages.dyme.steps"),
        ("--config.stages.dyme.steps=2.5", "stages.dyme.steps"),
        ("--config.stages.dyme.loss.beta=zero", "stages.dyme.loss.beta"),
        ("--config.stages.dyme.data.with_caption=maybe", "stages.dyme.data.with_caption"),
    ],
)
def test_command_line_wrong_type_fails_naming_the_key(monkeypatch, override, key):
    with pytest.raises(flags.Error) as error:
        parse_command_line(monkeypatch, "--config", f"{config_path('dyme')}:tiny", override)
    assert key in str(error.value)


def test_command_line_bad_value_fails_in_check_config_naming_the_key(monkeypatch):
    c = parse_command_line(monkeypatch, "--config", f"{config_path('dyme')}:tiny", "--config.stages.dyme.loss.beta=0.1")
    with pytest.raises(configuration.ConfigError, match=r"config\.stages\.dyme\.loss\.beta"):
        configuration.check_config(c)


def test_missing_math_verify_fails_check_config_naming_the_rewards_key(monkeypatch):
    """Without math-verify a run with an accuracy reward stops at start-up, in the config check (see test_rewards)."""
    monkeypatch.setitem(sys.modules, "math_verify", None)  # the import fails, as on an install without it
    with pytest.raises(
        configuration.ConfigError, match=r"stages\.grpo\.rewards: reward entry .*accuracy.*pip install math-verify"
    ):
        configuration.check_config(get_config("grpo", "tiny"))


def test_command_line_unknown_variant_fails_listing_the_variants(monkeypatch):
    with pytest.raises(flags.Error, match=r"unknown variant 'huge'"):
        parse_command_line(monkeypatch, "--config", f"{config_path('curr_reft')}:huge")
