"""Every recipe end to end on the tiny model (the reduced CI form of the recipes' tiny variants): two steps per
stage, stopped after the first step (a checkpoint is written), resumed with the same command to the end; the
rejection-sampling JSONL is written where the recipe has that stage. Every recipe's tiny variant (configs/grpo.py's
too) also trains the tiny Qwen3-VL (`--config.model.preset=qwen3_vl_tiny`, 64-px images): one step per stage and a
short eval, without the stop (resuming does not depend on the family: test_trainer.py stops and resumes both)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

from jaxvlm import models, trainer
from jaxvlm.data.jsonl import JsonlSource
from jaxvlm.metrics import read_metrics
from jaxvlm.processing.image import image_processor_for_model
from test_trainer import StopAfter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/grpo.py:tiny gets the same check in tests/test_grpo_variants.py, in one run with its algorithm variants.
RECIPES = ("sft", "dyme", "curr_reft", "clgrpo", "infi_mmr")
# CI stops and resumes dyme, curr_reft and infi_mmr; clgrpo (the costliest: four stages, ~2.5 min on 2 cores) and the
# one-stage sft recipe run their stage kinds there and in test_trainer's stop / resume; JAXVLM_FULL_TESTS=1 adds them.
CI_RECIPES = RECIPES if os.environ.get("JAXVLM_FULL_TESTS") else ("dyme", "curr_reft", "infi_mmr")


def load_config(name: str, arg: str = "tiny"):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def reduced(config, steps: int = 2, eval_examples: int = 4):
    """`steps` steps per stage, a short eval, a checkpoint every step."""
    for name in config.stage_order:
        stage = config.stages[name]
        stage.steps, stage.epochs = steps, 0
        if stage.mode == "rejection_sft":
            stage.rejection.num_prompts = stage.rejection.batch_size
    config.eval.num_examples = config.eval.batch_size = eval_examples
    config.eval.sampling.max_new_tokens = 8
    config.train.update(save_every=1, progress=False)
    return config


@pytest.mark.slow  # every recipe's stages end to end
@pytest.mark.parametrize("recipe", CI_RECIPES)
def test_recipe_runs_stops_and_resumes(recipe, tmp_path):
    config = reduced(load_config(recipe))
    workdir = str(tmp_path)
    first = trainer.run(config, workdir, stop=StopAfter(1))
    assert not first["finished"]
    first_stage = config.stage_order[0]
    assert os.listdir(os.path.join(workdir, "checkpoints", first_stage)) == ["1"]
    assert trainer.run(config, workdir)["finished"]

    with open(os.path.join(workdir, "progress.json")) as f:
        assert json.load(f)["completed"] == {name: 2 for name in config.stage_order}
    train = [r for r in read_metrics(workdir) if "train/loss" in r]
    # Step 1 of the first stage ran before the stop; the resumed run continued at step 2 (nothing repeated).
    assert [(r["train/stage"], r["train/stage_step"]) for r in train] == [
        (name, k) for name in config.stage_order for k in (1, 2)
    ]
    evals = [r["eval/stage"] for r in read_metrics(workdir) if "eval/accuracy" in r]
    assert evals == list(config.stage_order)
    for name in config.stage_order:
        assert "2" in os.listdir(os.path.join(workdir, "checkpoints", name))
        if config.stages[name].mode == "rejection_sft":
            kept = JsonlSource(os.path.join(workdir, "rejection", name, "kept.jsonl"))
            with open(os.path.join(workdir, "rejection", name, "summary.json")) as f:
                assert json.load(f)["kept"] == len(kept)
    assert os.path.isfile(os.path.join(workdir, "final_model", "config.json"))


# CI: DyME's recipe with Qwen3-VL; the sft, grpo, dyme and rejection_sft stage kinds are also in the Qwen3-VL
# trainer-mechanics run (test_trainer). JAXVLM_FULL_TESTS=1 runs every recipe with Qwen3-VL
# (curr_reft and clgrpo also ran in full by hand with qwen3_vl_tiny, issue 21).
QWEN3_VL_RECIPES = (*RECIPES, "grpo") if os.environ.get("JAXVLM_FULL_TESTS") else ("dyme",)


@pytest.mark.slow  # every recipe's stages end to end
@pytest.mark.parametrize("recipe", QWEN3_VL_RECIPES)
def test_recipe_trains_qwen3_vl(recipe, tmp_path):
    config = reduced(load_config(recipe), steps=1, eval_examples=2)
    config.model.preset = "qwen3_vl_tiny"  # the only change a user makes
    # The :tiny pixel bounds give the gym's 56 px images 2 x 2 image tokens in both families.
    for preset in ("tiny", "qwen3_vl_tiny"):
        bounds = dict(min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels)
        grid = image_processor_for_model(models.preset(preset), **bounds).grid_thw(56, 56)
        assert grid[1] * grid[2] // 4 == 4, (preset, grid)
    workdir = str(tmp_path)
    assert trainer.run(config, workdir)["finished"]

    with open(os.path.join(workdir, "progress.json")) as f:
        assert json.load(f)["completed"] == {name: 1 for name in config.stage_order}
    records = read_metrics(workdir)
    train = [r for r in records if "train/loss" in r]
    assert [r["train/stage"] for r in train] == list(config.stage_order)
    assert all(math.isfinite(r["train/loss"]) for r in train)
    assert [r["eval/stage"] for r in records if "eval/accuracy" in r] == list(config.stage_order)
    for name in config.stage_order:
        if config.stages[name].mode == "rejection_sft":
            kept = JsonlSource(os.path.join(workdir, "rejection", name, "kept.jsonl"))
            with open(os.path.join(workdir, "rejection", name, "summary.json")) as f:
                assert json.load(f)["kept"] == len(kept)
    with open(os.path.join(workdir, "final_model", "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen3_vl"
