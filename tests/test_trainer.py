"""The training loop: stages in order with re-anchored KL, metrics, evaluation, checkpoints and resume,
rejection sampling, signal handling (a child process gets SIGTERM) and the non-finite stop.

The mechanics run (`trained`: four stages, a stop and a resume, evaluation, rejection sampling, the final model) runs
once per model family, on its tiny preset (FAMILIES); the resume-equals-uninterrupted, subprocess, signal and NaN
tests run on the Qwen2.5-VL one only (the trainer has no family branch: the model comes from models.build_model)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxvlm import configuration, evaluation, models, rollouts, runtime, sampling, trainer
from jaxvlm.configuration import gym_source, stage
from jaxvlm.data.jsonl import JsonlSource
from jaxvlm.metrics import read_metrics, read_tensorboard_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TASKS = ("exists", "count")
DATA = dict(batch_size=2, max_prompt_length=256, on_error="skip", prefetch=0, num_threads=1)  # + targets: SFT_DATA
SFT_DATA = dict(DATA, max_target_length=160)
# Each family's tiny preset -> (config.json's model_type, our module, the transformers class that loads its export).
FAMILIES = {
    "tiny": ("qwen2_5_vl", models.Qwen25VL, "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl_tiny": ("qwen3_vl", models.Qwen3VL, "Qwen3VLForConditionalGeneration"),
}
# Image pixel bounds (min = max) giving every gym image 2 x 2 merged image tokens in both families: 14-px patches at
# 56 px, 16-px ones at 64 px (at 56 px, Qwen3-VL's resize factor 32 makes a 32-px image of one token, whose M-RoPE
# positions are those of a text token).
IMAGE_PIXELS = {"tiny": 56 * 56, "qwen3_vl_tiny": 64 * 64}


def mechanics_config(preset: str = "tiny"):
    """sft -> grpo (beta > 0) -> dyme -> rejection_sft, two steps each, on the gym with a tiny model preset."""
    c = configuration.base_config()
    c.model.update(preset=preset, min_pixels=IMAGE_PIXELS[preset], max_pixels=IMAGE_PIXELS[preset])
    c.mesh.shape = (1, 1, 1)
    c.train.update(save_every=1, progress=False)
    c.eval.update(sources=[gym_source("validation", 8, tasks=TRAIN_TASKS)], num_examples=2, batch_size=2)
    c.eval.sampling.max_new_tokens = 8
    prompts = [gym_source("train", 16, tasks=TRAIN_TASKS)]
    r1 = ["format_think_answer", "accuracy"]
    c.stage_order = ("sft", "grpo", "dyme", "reject")
    c.stages.sft = stage(
        "sft",
        steps=2,
        data=dict(SFT_DATA, sources=prompts, batch_size=4),
        batch=dict(micro_batches=2),
        optimizer=dict(learning_rate=3e-3, weight_decay=0.0),
    )
    c.stages.grpo = stage(
        "grpo",
        steps=2,
        data=dict(DATA, sources=prompts),
        rewards=r1,
        sampling=dict(num_generations=2, max_new_tokens=8),
        loss=dict(beta=0.04),
        optimizer=dict(learning_rate=3e-3, weight_decay=0.0),
        batch=dict(micro_batches=2),
    )
    c.stages.dyme = stage(
        "dyme",
        steps=2,
        data=dict(DATA, sources=prompts, prompt_style="dyme"),
        rewards=["format_dyme", {"name": "accuracy", "kwargs": {"extract": "dyme"}}],
        sampling=dict(num_generations=2, max_new_tokens=112),
        batch=dict(mini_batches=2),
    )
    c.stages.reject = stage(
        "rejection_sft",
        steps=2,
        data=dict(SFT_DATA, sources=prompts),
        rewards=r1,
        sampling=dict(num_generations=2, max_new_tokens=8),
        rejection=dict(
            min_reward=0.0,
            num_prompts=4,
            batch_size=2,
            text_share=0.5,
            text_sources=[gym_source("train", 8, tasks=("word_arithmetic",))],
        ),
    )
    return c


class StopAfter:
    """A stop request after n steps (what SIGTERM does, without a signal)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def requested(self):
        self.calls += 1
        return self.calls >= self.n


@pytest.fixture(scope="module", params=tuple(FAMILIES))
def trained(request, tmp_path_factory):
    """One mechanics run per family, stopped after GRPO's first step (its checkpoint holds the KL reference) and
    resumed with the same config to the end: the tests below see one run, with nothing repeated or missing."""
    workdir = str(tmp_path_factory.mktemp(f"run-{request.param}"))
    config = mechanics_config(request.param)
    assert not trainer.run(config, workdir, stop=StopAfter(3))["finished"]  # sft 1, 2, grpo 1
    with open(os.path.join(workdir, "progress.json")) as f:
        assert json.load(f)["completed"] == {"sft": 2}
    assert os.listdir(os.path.join(workdir, "checkpoints", "grpo")) == ["1"]
    result = trainer.run(config, workdir)
    return config, workdir, result


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_all_stages_run_in_order_and_write_metrics(trained):
    config, workdir, result = trained
    assert result["finished"] and result["stages"] == ["sft", "grpo", "dyme", "reject"]
    with open(os.path.join(workdir, "progress.json")) as f:
        assert json.load(f)["completed"] == {"sft": 2, "grpo": 2, "dyme": 2, "reject": 2}
    records = read_metrics(workdir)
    train = [r for r in records if "train/loss" in r]
    assert [(r["train/stage"], r["train/stage_step"]) for r in train] == [
        (s, k) for s in ("sft", "grpo", "dyme", "reject") for k in (1, 2)
    ]
    assert [r["step"] for r in train] == list(range(1, 9))  # one global step axis across stages
    assert all("train/reward" in r and "train/rewards/accuracy/mean" in r for r in train[2:6])
    assert all("train/dyme/memorize_fraction" in r for r in train[4:6])
    assert all("train/dyme/reference_nll" in r for r in train[4:6] if r["train/dyme/memorize_fraction"] > 0)
    assert all(math.isfinite(r["train/loss"]) for r in train)
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["eval/stage"] for r in evals] == ["sft", "grpo", "dyme", "reject"]
    assert all(set(f"eval/accuracy/task/{t}" for t in TRAIN_TASKS) <= set(r) for r in evals)
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_every_evaluation_writes_its_greedy_completions_and_reasoning_f1(trained):
    """eval_completions/<stage>-step<N>.jsonl: one row per evaluated example, whose scores average to the logged
    accuracy; with reasoning prompt styles each row's think_f1 is DyME's think_f1 of its own completion against its
    reference reasoning, and they average to eval/think_f1."""
    from jaxvlm import rewards

    config, workdir, _ = trained
    evals = [r for r in read_metrics(workdir) if "eval/accuracy" in r]
    assert sorted(os.listdir(os.path.join(workdir, "eval_completions"))) == sorted(
        f"{r['eval/stage']}-step{r['step']:06d}.jsonl" for r in evals
    )
    for r in evals:
        stage_name = r["eval/stage"]
        with open(evaluation.completions_path(workdir, stage_name, r["step"])) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == config.eval.num_examples == r["eval/examples"]
        assert all(row["task"] in TRAIN_TASKS and row["question"] and row["answer"] for row in rows)
        assert np.mean([row["score"] for row in rows]) == pytest.approx(r["eval/accuracy"])
        for field in ("task", "difficulty"):
            for value in {row[field] for row in rows}:
                assert r[f"eval/accuracy/{field}/{value}"] == pytest.approx(
                    np.mean([row["score"] for row in rows if row[field] == value])
                )
        extract = {"dyme": "dyme", "r1": "tags"}[config.stages[stage_name].data.prompt_style]
        for row in rows:  # gym examples all carry a reference reasoning
            assert row["think_f1"] == pytest.approx(
                rewards.think_f1_reward(row["completion"], {"reasoning": row["reasoning"]}, extract=extract)
            )
        assert np.mean([row["think_f1"] for row in rows]) == pytest.approx(r["eval/think_f1"])


def test_evaluation_writes_no_completions_when_switched_off_and_none_for_plain_prompts(tmp_path):
    config = mechanics_config()
    config.eval.save_completions = False
    spec = configuration.resolve(config)
    rt = runtime.setup(spec, str(tmp_path))
    path = evaluation.completions_path(str(tmp_path), "dyme", 1)
    metrics = evaluation.evaluate(rt, rt.init_params, evaluation.task_for_stage(spec.eval, spec.stage("dyme")), path)
    assert "think_f1" in metrics and not os.path.exists(path)
    config.eval.save_completions = True
    config.stages.sft.data.prompt_style = "plain"  # answer only: no reasoning to compare
    spec = configuration.resolve(config)
    metrics = evaluation.evaluate(rt, rt.init_params, evaluation.task_for_stage(spec.eval, spec.stage("sft")), path)
    assert "think_f1" not in metrics
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and all("think_f1" not in row for row in rows)


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_kl_reference_is_re_anchored_at_the_stage_start(trained):
    _, workdir, _ = trained
    grpo = [r for r in read_metrics(workdir) if r.get("train/stage") == "grpo"]
    # The GRPO stage starts from the SFT stage's params and so does its reference: the first update sees KL 0.
    assert abs(grpo[0]["train/kl"]) < 1e-5
    # Step 2 runs after the resume (see `trained`): the reference comes back from step 1's checkpoint, not from the
    # resumed params (which would give KL 0 again).
    if grpo[0]["train/advantage_abs_max"] > 0:  # the first update moved the params away from the reference
        assert grpo[1]["train/kl"] > 1e-6
    else:  # every group's rewards agreed (the sampled tokens vary with XLA's code generation): no gradient, no
        # weight decay, so the params still are the reference
        assert grpo[1]["train/kl"] == 0


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_rejection_sampling_writes_the_kept_set(trained):
    config, workdir, _ = trained
    kept = JsonlSource(os.path.join(workdir, "rejection", "reject", "kept.jsonl"))
    assert len(kept) == 4  # min_reward 0: every prompt keeps its best sample
    for k in range(len(kept)):
        example = kept[k]
        assert example["task"] in TRAIN_TASKS and len(example["images"]) == 1
        assert example["id"].endswith("#rejection")
    with open(os.path.join(workdir, "rejection", "reject", "summary.json")) as f:
        summary = json.load(f)
    assert summary["prompts"] == 4 and summary["kept"] == 4


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_final_model_is_a_hugging_face_checkpoint(trained):
    """workdir/final_model is the family's transformers checkpoint: our load_pretrained and transformers'
    AutoModelForImageTextToText read it (no missing, unexpected or mis-shaped tensor) as the family's model, its
    preprocessor_config.json gives transformers' image processor our pixels, and the two models' logits agree on a
    batch made from the exported files (text-only and image rows, left-padded)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from jaxvlm.processing import Processor

    config, workdir, _ = trained
    model_type, module, hf_class = FAMILIES[config.model.preset]
    path = os.path.join(workdir, "final_model")
    model, params = models.load_pretrained(path)
    assert type(model) is module and model.config.model_type == model_type and model.config.vision is not None
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == model_type
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id

    hf_model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert type(hf_model).__name__ == hf_class and hf_model.config.model_type == model_type

    processor = Processor.from_pretrained(path)
    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    chats = [
        [{"role": "user", "content": "How many shapes?"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle?"}]}],
    ]
    batch = processor([processor.apply_chat_template(chat) for chat in chats], [[], [image]])
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 4  # 2 x 2 (IMAGE_PIXELS)
    hf_pixels = Qwen2VLImageProcessorPil.from_pretrained(path)([image], return_tensors="np")
    np.testing.assert_array_equal(batch["pixel_values"], hf_pixels["pixel_values"])
    np.testing.assert_array_equal(batch["image_grid_thw"], hf_pixels["image_grid_thw"])

    hf_inputs = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    # transformers' processors return int64 ids (its rope index writes them into an int64 tensor)
    hf_batch = {k: torch.as_tensor(batch[k].astype(np.int64 if k != "pixel_values" else np.float32)) for k in hf_inputs}
    with torch.no_grad():
        expected = hf_model(**hf_batch).logits.numpy()  # [B, T, V]
    inputs = sampling.prepare_prompts(model.config, batch)  # the images laid out on the host, as for the trainer
    ours = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, inputs))  # [B, T, V]
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(ours[valid] - expected[valid]).max() < 1e-4
    assert np.abs(expected[valid]).max() > 0.1  # not two near-zero tensors


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_rerun_of_a_finished_workdir_trains_nothing(trained):
    config, workdir, _ = trained
    before = len(read_metrics(workdir))
    result = trainer.run(config, workdir)
    assert result["finished"]
    assert len(read_metrics(workdir)) == before


def sft_grpo_config(steps=2):
    c = mechanics_config()
    c.stage_order = ("sft", "grpo")
    c.stages.sft.steps = steps
    c.stages.grpo.steps = steps
    c.stages.grpo.loss.beta = 0.0
    return c


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_stop_mid_stage_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    trainer.run(sft_grpo_config(), str(whole))
    parts = tmp_path / "parts"
    assert not trainer.run(sft_grpo_config(), str(parts), stop=StopAfter(1))["finished"]  # stops in sft
    assert not trainer.run(sft_grpo_config(), str(parts), stop=StopAfter(2))["finished"]  # sft done, stops in grpo
    assert trainer.run(sft_grpo_config(), str(parts))["finished"]
    runs = [[r for r in read_metrics(w) if "train/loss" in r] for w in (whole, parts)]
    assert [(r["train/stage"], r["train/stage_step"]) for r in runs[1]] == [
        (r["train/stage"], r["train/stage_step"]) for r in runs[0]
    ]
    for a, b in zip(*runs):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-6)
        if "train/reward" in a:
            assert a["train/reward"] == b["train/reward"]
    _, p_whole = models.load_pretrained(str(whole / "final_model"))
    _, p_parts = models.load_pretrained(str(parts / "final_model"))
    for x, y in zip(_leaves(p_whole), _leaves(p_parts)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _leaves(tree):
    return jax.tree.leaves(tree)


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_nan_reward_is_contained_and_poisoned_batches_stop_the_run(tmp_path, monkeypatch):
    """Step 1: every reward total is NaN -> those rows get advantage 0 (losses.group_advantages), the update is
    finite. Steps 2+: the batch's old log-probs are NaN -> non-finite loss, the update is skipped; after
    max_consecutive_skips the run stops naming the step and the quantity."""
    real = rollouts.sample_and_score
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 1:
            out.scores.total[:] = np.nan
        elif calls["n"] >= 2:
            out.rows["old_logp"] = np.full_like(out.rows["old_logp"], np.nan)
        return out

    monkeypatch.setattr(rollouts, "sample_and_score", poisoned)
    c = sft_grpo_config(steps=6)
    c.stage_order = ("grpo",)
    c.train.max_consecutive_skips = 2
    with pytest.raises(
        trainer.TrainingDiverged,
        match=r"stage 'grpo' step 3: 2 consecutive updates skipped; "
        r"non-finite loss=nan",
    ):
        trainer.run(c, str(tmp_path))
    train = [r for r in read_metrics(str(tmp_path)) if "train/update_skipped" in r]
    assert [r["train/update_skipped"] for r in train] == [0.0, 1.0]
    assert train[0]["train/advantage_abs_max"] == 0.0 and math.isfinite(train[0]["train/loss"])
    assert train[1]["train/loss"] is None  # NaN is written as null
    assert train[1]["train/skipped_updates/consecutive"] == 1


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    c = mechanics_config()
    c.stage_order = ("sft", "nope")
    with pytest.raises(configuration.ConfigError, match=r"config.stage_order: names stage 'nope'"):
        trainer.run(c, str(tmp_path))
    c = mechanics_config()
    c.stages.grpo.batch.micro_batches = 3
    with pytest.raises(configuration.ConfigError, match=r"config.stages.grpo.batch: 4 rollout rows"):
        trainer.run(c, str(tmp_path))
    c = mechanics_config()
    c.stages.dyme.loss.beta = 0.1
    with pytest.raises(configuration.ConfigError, match=r"stages.dyme.loss.beta"):
        trainer.run(c, str(tmp_path))
    c = mechanics_config()
    c.stages.grpo.rewards = ["format_think_answer", "acuracy"]
    with pytest.raises(configuration.ConfigError, match=r"stages.grpo.rewards: .*acuracy"):
        trainer.run(c, str(tmp_path))


SIGNAL_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from test_trainer import sft_grpo_config
def get_config(arg=None):
    c = sft_grpo_config(steps=int(arg))
    c.stage_order = ("sft",)
    c.train.save_every = 1000
    return c
"""


@pytest.mark.slow  # trains (the fast tier keeps the config and evaluation checks)
def test_sigterm_writes_a_checkpoint_and_the_same_command_resumes(tmp_path):
    config_file = tmp_path / "signal_config.py"
    config_file.write_text(SIGNAL_CONFIG.format(tests=os.path.join(ROOT, "tests")))
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "jaxvlm.main", "--config", f"{config_file}:400", "--workdir", str(workdir)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 2:
            break
        time.sleep(0.5)
    assert child.poll() is None, child.stdout.read().decode()[-3000:]
    child.send_signal(signal.SIGTERM)
    output = child.communicate(timeout=300)[0].decode()
    assert child.returncode == 0, output[-3000:]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints" / "sft") if d.isdigit())
    assert steps and 2 <= steps[-1] < 400  # save_every=1000: only the signal could have written it
    stopped_at = steps[-1]
    # The same command (with a shorter stage, to finish quickly) resumes after the checkpointed step.
    cmd[4] = f"{config_file}:{stopped_at + 1}"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # A finished run ends with the evaluation table and the curves (jaxvlm.report).
    assert "Held-out accuracy" in done.stdout and "after sft" in done.stdout, done.stdout[-3000:]
    assert (workdir / "accuracy.png").is_file() and (workdir / "reward.png").is_file()
    train = [r for r in read_metrics(str(workdir)) if "train/loss" in r]
    assert [r["train/stage_step"] for r in train][-1] == stopped_at + 1
    assert [r["train/stage_step"] for r in train] == list(range(1, stopped_at + 2))
