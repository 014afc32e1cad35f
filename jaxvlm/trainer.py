"""The training loop: `run(config, workdir)` runs a recipe's stages in order, one readable loop per stage kind.

    setup (tokenizer, model, mesh)
    for each stage in config.stage_order (skipping completed ones, resuming a partial one):
        params <- the previous stage's final params; the KL reference <- these params (re-anchored per stage)
        sft / rejection_sft:  batch -> micro-batches -> sft_step
        grpo / dyme:          prompts -> sampler (G rollouts each) -> rewards -> advantages (or DyME's plan)
                              -> [K, M, b] mini/micro-batches -> grpo_step / dyme_step
        every step: metrics (JSONL + TensorBoard + progress bar), evaluation every eval_every steps and at the end,
        checkpoints every save_every steps; SIGTERM/SIGINT -> checkpoint and clean exit; K consecutive non-finite
        updates -> stop with the step and the quantity
    export the final params as a Hugging Face checkpoint (workdir/final_model)

Layout of `workdir`: `checkpoints/<stage>/<step>/` (Orbax: train state, KL reference, data-iterator state),
`progress.json` (completed stages), `metrics.jsonl`, `tensorboard/`, `rejection/<stage>/kept.jsonl`,
`tokenizer/` (the built-in tokenizer), `final_model/`. Re-running the same command resumes.

Data is read as the *global* batch on every process (each process decodes and scores every rollout, so rewards
and advantages agree everywhere) and fed to the devices with `distributed.feed_global_batch`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvlm import batching, configuration, distributed, losses, models, rewards, sampling, sharding, train_steps
from jaxvlm.checkpoint import TrainCheckpointer, abstract_like
from jaxvlm.data import pipeline, sources
from jaxvlm.metrics import MetricsWriter, ProgressBar, StepTimer
from jaxvlm.processing.image import ImageProcessor

PROGRESS_FILE = "progress.json"


class TrainingDiverged(RuntimeError):
    """K consecutive updates were skipped because a quantity went non-finite."""


# ----------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    """What every stage shares."""

    config: Any
    workdir: str
    model: models.Qwen25VL
    tokenizer: Any
    image_processor: ImageProcessor | None
    mesh: jax.sharding.Mesh
    writer: MetricsWriter
    init_params: Any

    @property
    def model_config(self) -> models.ModelConfig:
        return self.model.config

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def _tokenizer(config, workdir: str):
    from transformers import AutoTokenizer

    from jaxvlm.tokenizer import builtin_tokenizer

    if config.model.tokenizer:
        return AutoTokenizer.from_pretrained(config.model.tokenizer)
    if config.model.path:
        return AutoTokenizer.from_pretrained(config.model.path)
    suffix = f"-{jax.process_index()}" if jax.process_count() > 1 else ""  # no two writers on one directory
    return builtin_tokenizer(os.path.join(workdir, "tokenizer" + suffix))


def _mesh(shape) -> jax.sharding.Mesh:
    shape = tuple(int(d) for d in shape)
    devices = jax.devices()
    if -1 not in shape and math.prod(shape) < len(devices):
        if jax.process_count() > 1:
            raise configuration.ConfigError(
                f"config.mesh.shape: {shape} uses {math.prod(shape)} of the {len(devices)} devices of a "
                f"{jax.process_count()}-process run; every process needs devices in the mesh (e.g. (1, -1, 1))")
        devices = devices[: math.prod(shape)]  # e.g. (1, 1, 1) on a multi-device host
    return sharding.make_mesh(shape, devices)


def setup(config, workdir: str) -> Runtime:
    """Tokenizer, model (checkpoint or preset with random weights), image processor, mesh, metrics writer."""
    from jaxvlm.tokenizer import configure_model_for_tokenizer

    m = config.model
    if not m.path and not m.preset:
        raise configuration.ConfigError(
            "config.model.path: this config trains a real checkpoint; set --config.model.path=/path/to/checkpoint "
            "(or --config.model.preset=tiny for a random-weight toy model)")
    os.makedirs(workdir, exist_ok=True)
    tokenizer = _tokenizer(config, workdir)
    if m.path:
        model, params = models.load_pretrained(m.path, **configuration.model_options(m))
    else:
        model_cfg = configure_model_for_tokenizer(models.preset(m.preset, **configuration.model_options(m)), tokenizer)
        model, params = models.Qwen25VL(model_cfg), models.init_params(model_cfg, config.seed)
    image_processor = None
    vc = model.config.vision
    if vc is not None:
        if m.path and os.path.isfile(os.path.join(m.path, "preprocessor_config.json")):
            image_processor = dataclasses.replace(
                ImageProcessor.from_pretrained(m.path), min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        else:
            image_processor = ImageProcessor(
                min_pixels=m.min_pixels, max_pixels=m.max_pixels, patch_size=vc.patch_size,
                temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=config.train.tensorboard)
    return Runtime(config, workdir, model, tokenizer, image_processor, _mesh(config.mesh.shape), writer, params)


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


to_host = distributed.host_value


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


class StopSignal:
    """SIGTERM / SIGINT set a flag (checked between steps) instead of killing the process mid-write."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signum
        logging.warning("received signal %d: checkpointing after this step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return _any_process(self.received is not None)


def _load_progress(workdir: str) -> dict:
    path = os.path.join(workdir, PROGRESS_FILE)
    if not os.path.isfile(path):
        return {"completed": {}}
    with open(path) as f:
        return json.load(f)


def _save_progress(rt: Runtime, progress: dict) -> None:
    if rt.is_main:
        tmp = os.path.join(rt.workdir, PROGRESS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(progress, f, indent=2)
        os.replace(tmp, os.path.join(rt.workdir, PROGRESS_FILE))


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.tree.map(to_host, metrics).items()}


def _nonfinite(metrics: dict[str, float], keys=("loss", "grad_norm", "reward", "advantage_abs_max")) -> list[str]:
    return [f"{k}={metrics[k]}" for k in keys if k in metrics and not math.isfinite(metrics[k])]


# ----------------------------------------------------------------------------------------------------------
# Stage plumbing
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StagePlan:
    name: str
    cfg: Any  # the stage's ConfigDict
    data: dict  # the data section with overrides applied (sources included)
    steps: int
    leading: tuple[int, ...]  # (M,) for SFT, (K, M) for RL
    loss: train_steps.LossConfig
    optimizer_cfg: train_steps.OptimizerConfig


def plan_stage(rt: Runtime, name: str, data_sources: list | None = None) -> StagePlan:
    """Resolve a stage's data overrides, step count and static configs."""
    s = rt.config.stages[name]
    data = s.data.to_dict()
    if data_sources is not None:
        data["sources"] = data_sources
    if jax.process_count() > 1:
        data["shard_by_process"] = False  # every process reads the global batch (see the module docstring)
    data["seed"] = data.get("seed", 0) + rt.config.seed
    if s.mode in ("sft", "rejection_sft"):
        data["with_targets"] = True
    elif s.mode == "dyme":
        data["with_targets"] = True  # the memorisation rows' reference completions ...
        data["max_target_length"] = s.sampling.max_new_tokens  # ... have the rollouts' width
    else:
        data["with_targets"] = False
    steps = int(s.steps)
    if steps == 0:
        first = sources.make_source(dict(data["sources"][0]), f"stages.{name}.data.sources[0]")
        share = 1.0
        if len(data["sources"]) > 1:
            weights = sources.source_weights(data["sources"])
            share = weights[0] / sum(weights)
        steps = max(1, int(s.epochs * len(first) / share) // data["batch_size"])
        data["num_epochs"] = int(s.epochs)
    rl = s.mode in configuration.RL_MODES
    leading = (s.batch.mini_batches, s.batch.micro_batches) if rl else (s.batch.micro_batches,)
    loss = configuration.loss_config(s)
    updates_per_step = s.batch.mini_batches * loss.num_iterations if rl else 1
    return StagePlan(name, s, data, steps, leading, loss, configuration.optimizer_config(s, steps * updates_per_step))


def _fresh_state(rt: Runtime, plan: StagePlan, params):
    """The stage's optimizer and a train state born sharded on the mesh (also across processes)."""
    optimizer = train_steps.make_optimizer(plan.optimizer_cfg, params)
    seed = rt.config.seed

    def init(p):
        return train_steps.create_train_state(p, optimizer, jax.random.key(seed))

    shardings = train_steps.state_shardings(jax.eval_shape(init, params), rt.mesh)
    params = distributed.put_global(params, shardings.params)
    state = jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)
    return optimizer, state, shardings


def _checkpoint_tree(state, ref_params):
    return {"state": state} if ref_params is None else {"state": state, "ref_params": ref_params}


def stage_final_params(rt: Runtime, name: str, params_template):
    """The last checkpointed params of a completed stage (to start the next stage after a restart)."""
    plan = plan_stage(rt, name)
    optimizer = train_steps.make_optimizer(plan.optimizer_cfg, params_template)
    state = jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, jax.random.key(0)), params_template)
    shardings = train_steps.state_shardings(state, rt.mesh)
    ref = state.params if plan.loss.beta > 0 else None
    tree = _checkpoint_tree(state, ref)
    tree_sh = _checkpoint_tree(shardings, None if ref is None else shardings.params)
    with TrainCheckpointer(os.path.join(rt.workdir, "checkpoints", name), save_every=1) as ckpt:
        restored, _, _ = ckpt.restore(abstract_like(tree, tree_sh))
    return restored["state"].params


# ----------------------------------------------------------------------------------------------------------
# Batches for the steps
# ----------------------------------------------------------------------------------------------------------


def _row_pixels(rt: Runtime, batch: dict, repeat: int = 1):
    if "pixel_values" not in batch["prompts"]:
        return None
    per_row = batching.pixels_per_row(batch["prompts"], [ex["num_images"] for ex in batch["examples"]])
    return batching.repeat_rows(per_row, repeat) if repeat > 1 else per_row


def sft_microbatches(rt: Runtime, plan: StagePlan, batch: dict) -> dict:
    """A pipeline batch (with targets) as `[M, b, ...]` micro-batches for `sft_step`."""
    return batching.microbatches(pipeline.sft_batch(batch), plan.leading, row_pixels=_row_pixels(rt, batch),
                                 vision_config=rt.model_config.vision,
                                 slot_multiple=sharding.data_parallel_size(rt.mesh))


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What `sample_and_score` reads from a stage's `sampling` section (a ConfigDict works as well)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0


@dataclasses.dataclass
class Rollouts:
    completions: list[str]
    examples: list[dict]
    scores: rewards.RewardResult
    accuracy: np.ndarray  # [R]
    rows: dict  # prompt_ids, prompt_mask, completion_ids, completion_mask, position_ids, old_logp  [R, ...]
    lengths: np.ndarray
    truncated: np.ndarray


def sample_and_score(rt: Runtime, params, batch: dict, key, *, num_generations: int, sampling_cfg, reward_specs,
                     accuracy_reward: str | None) -> Rollouts:
    """G rollouts per prompt from the sampler, decoded and scored on the host."""
    prompts = batch["prompts"]
    rollout = sampling.generate(
        rt.model, params, prompts, key, num_generations=num_generations,
        max_new_tokens=sampling_cfg.max_new_tokens, temperature=sampling_cfg.temperature,
        top_p=sampling_cfg.top_p, top_k=sampling_cfg.top_k, min_p=sampling_cfg.min_p, mesh=rt.mesh,
    )
    host = jax.tree.map(to_host, rollout)
    completions = sampling.decode_completions(rt.tokenizer, host)
    examples = [ex for ex in batch["examples"] for _ in range(num_generations)]
    scores = rewards.compute_rewards(reward_specs, completions, examples)
    names = list(scores.names)
    accuracy = (scores.per_reward[:, names.index(accuracy_reward)] if accuracy_reward in names
                else np.zeros(len(completions), np.float32))
    rows = sampling.update_rows(sampling.prepare_prompts(rt.model_config, prompts), host, num_generations)
    return Rollouts(completions, examples, scores, accuracy, rows, host.lengths, host.truncated)


def _reference_logprobs_fn(rt: Runtime, num_leading: int, temperature: float):
    """Jitted log π_ref(completion) [*leading, b, N] over micro-batches (lax.map: one micro-batch at a time)."""
    model = rt.model

    def score(params, mb):
        lead = mb["completion_ids"].shape[:num_leading]
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[num_leading:]), mb)
        logp = jax.lax.map(lambda one: train_steps.completion_logprobs(model, params, one, temperature), flat)
        return logp.reshape(*lead, *logp.shape[1:])

    return jax.jit(score)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


# How each prompt style's completions are read: the answer (rewards.extract_answer) and, except for "plain" (answer
# only), the reasoning (rewards.think_f1_reward).
_EXTRACT = {"r1": "tags", "dyme": "dyme", "plain": "raw"}


def _default_accuracy_spec(prompt_style: str) -> rewards.RewardSpec:
    return rewards.RewardSpec("accuracy", 1.0, {"extract": _EXTRACT[prompt_style]})


def accuracy_spec(stage_cfg) -> rewards.RewardSpec:
    """The stage's correctness reward (its `accuracy_reward` entry), else accuracy for its prompt style."""
    if stage_cfg.rewards:
        specs = rewards.parse_reward_specs(list(stage_cfg.rewards))
        names = rewards.display_names(specs)
        if stage_cfg.accuracy_reward in names:
            return specs[names.index(stage_cfg.accuracy_reward)]
    return _default_accuracy_spec(stage_cfg.data.prompt_style)


def evaluation_completions_path(workdir: str, stage: str, step: int) -> str:
    """Where `evaluate` writes one evaluation's greedy completions (JSON lines)."""
    return os.path.join(workdir, "eval_completions", f"{stage}-step{step:06d}.jsonl")


def evaluate(rt: Runtime, params, stage_cfg, completions_path: str | None = None) -> dict[str, float]:
    """Greedy decoding on the eval sources in the stage's prompt style; accuracy overall, per task and per
    difficulty (eval.num_examples rounded down to whole eval batches).

    For prompt styles with reasoning (dyme, r1), `think_f1` is the mean word-overlap F1 of the greedy reasoning with
    the examples' reference reasoning (DyME's thinking reward; examples without a reference are left out). It counts
    template words too (the demo's reasoning scores ~0.7 while copying none of its caption), so read the completions
    to see whether the reasoning reads its input: accuracy alone does not show it. With
    `completions_path` (and eval.save_completions), every completion is written there, one JSON line per example:
    id, task, difficulty, question, reference answer, completion, score (and the reference reasoning with think_f1)."""
    e = rt.config.eval
    d = stage_cfg.data
    data = {
        "sources": [dict(x) for x in e.sources], "batch_size": e.batch_size, "prompt_style": d.prompt_style,
        "with_caption": d.with_caption, "max_prompt_length": d.max_prompt_length, "shuffle": False,
        "num_epochs": 1, "drop_remainder": True, "prefetch": 0, "on_error": d.on_error,
        "shard_by_process": False,
    }
    iterator = iter(sources.input_pipeline(data, rt.tokenizer, rt.image_processor, rt.model_config))
    spec = accuracy_spec(stage_cfg)
    extract = _EXTRACT[d.prompt_style]
    greedy = SamplingSettings(max_new_tokens=e.max_new_tokens, temperature=0.0)
    rows, lengths = [], []  # one row per example (written out with completions_path)
    for batch in iterator:
        if len(rows) >= e.num_examples:
            break
        out = sample_and_score(rt, params, batch, jax.random.key(0), num_generations=1, sampling_cfg=greedy,
                               reward_specs=(spec,), accuracy_reward=None)
        for completion, example, score in zip(out.completions, out.examples, out.scores.per_reward[:, 0]):
            row = {"id": example.get("id", ""), "task": example.get("task", "") or "unknown",
                   "difficulty": int(example.get("difficulty", 0)), "question": example.get("question", ""),
                   "answer": str(example.get("answer", "")), "completion": completion, "score": float(score)}
            if extract != "raw" and example.get("reasoning"):
                row["reasoning"] = str(example["reasoning"])
                row["think_f1"] = rewards.think_f1_reward(completion, example, extract=extract)
            rows.append(row)
        lengths += out.lengths.tolist()
    if not rows:
        raise ValueError(f"eval: no complete batch of {e.batch_size} examples in eval.sources")
    scores = np.asarray([row["score"] for row in rows])
    metrics = {"accuracy": float(scores.mean()), "completion_length": float(np.mean(lengths)),
               "examples": float(len(rows))}
    thinking = [row["think_f1"] for row in rows if "think_f1" in row]
    if thinking:
        metrics["think_f1"] = float(np.mean(thinking))
    for field in ("task", "difficulty"):
        groups = np.asarray([row[field] for row in rows])
        for value in sorted(set(groups.tolist())):
            metrics[f"accuracy/{field}/{value}"] = float(scores[groups == value].mean())
    if completions_path and e.save_completions and rt.is_main:
        os.makedirs(os.path.dirname(completions_path), exist_ok=True)
        with open(completions_path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(completions_path + ".tmp", completions_path)
    return metrics



def _log_evaluation(rt: Runtime, params, stage_cfg, name: str, step: int) -> None:
    """Evaluate, log eval/* at `step` and write the completions file of this evaluation."""
    metrics = evaluate(rt, params, stage_cfg, evaluation_completions_path(rt.workdir, name, step))
    rt.writer.write(step, {**metrics, "stage": name}, prefix="eval/")

# ----------------------------------------------------------------------------------------------------------
# Rejection sampling (Curr-ReFT's self-improvement stage)
# ----------------------------------------------------------------------------------------------------------


def rejection_sample(rt: Runtime, name: str, params) -> str:
    """Sample `num_samples` completions per prompt, keep each prompt's best one if its total reward reaches
    `min_reward`, and write the kept set to `rejection/<stage>/kept.jsonl` (+ PNGs; `target` = the completion).

    Returns the JSONL path. A finished file (marked by `summary.json`) is reused when a run resumes.
    """
    from jaxvlm.data.export import write_jsonl_dataset

    s = rt.config.stages[name]
    r = s.rejection
    out_dir = os.path.join(rt.workdir, "rejection", name)
    path, summary_path = os.path.join(out_dir, "kept.jsonl"), os.path.join(out_dir, "summary.json")
    if os.path.isfile(summary_path):
        return path
    data = s.data.to_dict()
    data.update(batch_size=r.batch_size, with_targets=False, shuffle=True, num_epochs=1, drop_remainder=True,
                prefetch=0, shard_by_process=False, seed=data.get("seed", 0) + rt.config.seed, keep_images=True)
    iterator = iter(sources.input_pipeline(data, rt.tokenizer, rt.image_processor, rt.model_config))
    specs = rewards.parse_reward_specs(list(s.rewards))
    sp = SamplingSettings(max_new_tokens=s.sampling.max_new_tokens, temperature=r.temperature,
                          top_p=s.sampling.top_p, top_k=s.sampling.top_k, min_p=s.sampling.min_p)
    kept, best_rewards, seen = [], [], 0
    key = jax.random.key(rt.config.seed + 7919)
    for step, batch in enumerate(iterator):
        if seen >= r.num_prompts:
            break
        out = sample_and_score(rt, params, batch, jax.random.fold_in(key, step), num_generations=r.num_samples,
                               sampling_cfg=sp, reward_specs=specs, accuracy_reward=None)
        totals = out.scores.total.reshape(-1, r.num_samples)
        for b, example in enumerate(batch["examples"]):
            best = int(np.argmax(totals[b]))
            best_rewards.append(float(totals[b, best]))
            if totals[b, best] >= r.min_reward:
                completion = out.completions[b * r.num_samples + best]
                kept.append({**example, "target": completion.strip(), "id": f"{example['id']}#rejection"})
        seen += len(batch["examples"])
    if rt.is_main:
        os.makedirs(out_dir, exist_ok=True)
        write_jsonl_dataset(kept, out_dir, name="kept.jsonl")
        with open(summary_path, "w") as f:
            json.dump({"prompts": seen, "kept": len(kept), "min_reward": r.min_reward,
                       "mean_best_reward": float(np.mean(best_rewards)) if best_rewards else None}, f, indent=2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"rejection {name}")
    if not kept:
        raise ValueError(f"stage {name}: rejection sampling kept no sample of {seen} prompts (min_reward="
                         f"{r.min_reward}); lower stages.{name}.rejection.min_reward or train longer first")
    return path


# ----------------------------------------------------------------------------------------------------------
# The stage loop
# ----------------------------------------------------------------------------------------------------------


def run_stage(rt: Runtime, name: str, params, global_offset: int, stop: StopSignal) -> tuple[Any, bool]:
    """Run (or resume) one stage from `params`. Returns (final params, finished: False when stopped by a signal)."""
    s = rt.config.stages[name]
    data_sources = None
    if s.mode == "rejection_sft":
        kept = rejection_sample(rt, name, params)
        r = s.rejection
        data_sources = [{"kind": "jsonl", "path": kept, "weight": 1.0 - r.text_share}]
        data_sources += [dict(e, weight=r.text_share / len(r.text_sources)) for e in r.text_sources]
        if r.text_share == 0:
            data_sources = data_sources[:1]
    plan = plan_stage(rt, name, data_sources)
    rl = s.mode in configuration.RL_MODES
    optimizer, state, state_sh = _fresh_state(rt, plan, params)
    schedule = train_steps.learning_rate_schedule(plan.optimizer_cfg)
    # The KL reference is re-anchored to the stage's start; a copy, because the step donates the state's buffers.
    ref_params = jax.tree.map(jnp.copy, state.params) if plan.loss.beta > 0 else None
    ckpt = TrainCheckpointer(os.path.join(rt.workdir, "checkpoints", name), save_every=rt.config.train.save_every,
                             keep=rt.config.train.keep_checkpoints)
    dataset = sources.input_pipeline(plan.data, rt.tokenizer, rt.image_processor, rt.model_config)
    iterator = iter(dataset)
    start, skipped_totals = 0, None
    if ckpt.latest_step() is not None:
        tree_sh = _checkpoint_tree(state_sh, None if ref_params is None else state_sh.params)
        restored, data_state, _ = ckpt.restore(abstract_like(_checkpoint_tree(state, ref_params), tree_sh))
        state, ref_params = restored["state"], restored.get("ref_params")
        iterator.set_state(data_state["iterator"])
        start, skipped_totals = int(data_state["stage_step"]), data_state["skipped"]
        logging.info("stage %s: resumed at step %d", name, start)
    if start >= plan.steps:
        ckpt.close()
        return state.params, True

    step_fn = {"sft": train_steps.sft_step, "rejection_sft": train_steps.sft_step, "grpo": train_steps.grpo_step,
               "dyme": train_steps.dyme_step}[s.mode]
    specs = rewards.parse_reward_specs(list(s.rewards)) if rl else ()
    ref_logprobs = _reference_logprobs_fn(rt, len(plan.leading), plan.loss.temperature) if ref_params is not None \
        else None
    compiled = None
    timer = StepTimer()
    bar = ProgressBar(plan.steps, desc=f"[{name}] {s.mode}", enabled=rt.config.train.progress and rt.is_main)
    consecutive_skips, finished, done = 0, True, start
    key = jax.random.fold_in(jax.random.key(rt.config.seed), zlib.crc32(name.encode()))  # same on every process
    try:
        for step in range(start, plan.steps):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            skipped_totals = pipeline.add_skip_counts(skipped_totals, batch)
            timer.start()
            host_metrics: dict[str, float] = {}
            if rl:
                t0 = time.perf_counter()
                out = sample_and_score(rt, state.params, batch, jax.random.fold_in(key, step),
                                       num_generations=s.sampling.num_generations, sampling_cfg=s.sampling,
                                       reward_specs=specs, accuracy_reward=s.accuracy_reward)
                host_metrics.update(_rollout_metrics(out, plan))
                host_metrics["time/rollout_s"] = time.perf_counter() - t0
                rows = dict(out.rows)
                g = s.sampling.num_generations
                if s.mode == "grpo":
                    advantages = np.asarray(losses.group_advantages(
                        jnp.asarray(out.scores.total), g, scale=plan.loss.advantage_scale))
                    rows["advantages"] = advantages.astype(np.float32)
                    host_metrics["advantage_abs_max"] = float(np.max(np.abs(advantages)))
                else:
                    rows["rewards"] = out.scores.total.astype(np.float32)
                    rows["accuracy"] = out.accuracy.astype(np.float32)
                    rows["reference_ids"] = np.repeat(batch["targets"]["completion_ids"], g, axis=0)
                    rows["reference_mask"] = np.repeat(batch["targets"]["completion_mask"], g, axis=0)
                mb = batching.microbatches(rows, plan.leading, row_pixels=_row_pixels(rt, batch, g),
                                           vision_config=rt.model_config.vision,
                                           slot_multiple=sharding.data_parallel_size(rt.mesh))
            else:
                mb = sft_microbatches(rt, plan, batch)
            if ref_logprobs is not None:
                mb["ref_logp"] = np.zeros_like(mb["old_logp"])  # filled on the device below
            if compiled is None:
                compiled, batch_sh = train_steps.jit_step(
                    step_fn, rt.mesh, state_sh, mb, len(plan.leading), model=rt.model, optimizer=optimizer,
                    schedule=schedule, cfg=plan.loss)
            device_mb = distributed.feed_global_batch(mb, batch_sh)
            if ref_logprobs is not None:
                device_mb["ref_logp"] = jax.device_put(ref_logprobs(ref_params, device_mb), batch_sh["ref_logp"])
            t0 = time.perf_counter()
            state, metrics = compiled(state, device_mb)
            metrics = {**_scalars(metrics), **host_metrics}
            if metrics.get("reference_tokens", 0) > 0:  # DyME memorisation rows' token NLL
                metrics["dyme/reference_nll"] = metrics["reference_nll_sum"] / metrics["reference_tokens"]
            metrics["time/update_s"] = time.perf_counter() - t0
            metrics["time/step_s"] = timer.stop()
            metrics.update(pipeline.skip_metrics(skipped_totals))

            problems = _nonfinite(metrics)
            if metrics.get("update_skipped", 0) > 0:
                consecutive_skips += 1
                if consecutive_skips >= rt.config.train.max_consecutive_skips:
                    raise TrainingDiverged(
                        f"stage {name!r} step {step + 1}: {consecutive_skips} consecutive updates skipped; non-finite "
                        f"{', '.join(problems) or 'gradient'} (train.max_consecutive_skips="
                        f"{rt.config.train.max_consecutive_skips}); params are those of the last finite update")
                logging.warning("stage %s step %d: update skipped (non-finite %s)", name, step + 1,
                                ", ".join(problems) or "gradient")
            else:
                consecutive_skips = 0
            metrics["skipped_updates/consecutive"] = float(consecutive_skips)

            done = step + 1
            global_step = global_offset + done
            if done % rt.config.train.log_every == 0 or done == plan.steps:
                rt.writer.write(global_step, {**metrics, "stage_step": done, "stage": name}, prefix="train/")
            bar.update(done, metrics)
            if rt.config.train.eval_every and done % rt.config.train.eval_every == 0 and done < plan.steps:
                _log_evaluation(rt, state.params, s, name, global_step)
            data_state = {"iterator": iterator.get_state(), "stage_step": done, "skipped": skipped_totals}
            stopping = stop.requested()
            ckpt.save(done, _checkpoint_tree(state, ref_params), data_state=data_state, force=stopping)
            if stopping:
                finished = False
                logging.warning("stage %s: stopped by signal after step %d; checkpoint written", name, done)
                break
        if finished:
            rt.writer.write(global_offset + done, {**timer.summary(), "stage": name}, prefix="time/")
            _log_evaluation(rt, state.params, s, name, global_offset + done)
            ckpt.save(done, _checkpoint_tree(state, ref_params), force=True, data_state={
                "iterator": iterator.get_state(), "stage_step": done, "skipped": skipped_totals})
    finally:
        bar.close()
        ckpt.wait_until_finished()
        ckpt.close()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return state.params, finished


def _rollout_metrics(out: Rollouts, plan: StagePlan) -> dict[str, float]:
    g = plan.loss.group_size
    metrics = dict(out.scores.metrics())
    stats = losses.group_reward_stats(jnp.asarray(out.scores.total), g)
    metrics.update(
        reward=float(np.mean(out.scores.total)),
        accuracy=float(np.mean(out.accuracy)),
        completion_length=float(np.mean(out.lengths)),
        truncated_fraction=float(np.mean(out.truncated)),
        frac_reward_zero_std=float(stats["zero_std_fraction"]),
    )
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def run(config, workdir: str, stop: StopSignal | None = None) -> dict:
    """Run (or resume) every stage of `config` in `workdir`. Returns {"finished": bool, "stages": [...]}.

    `stop`: what says "checkpoint and exit" between steps (default: SIGTERM / SIGINT).
    """
    configuration.check_config(config)
    rt = setup(config, workdir)
    progress = _load_progress(workdir)
    params = None
    with stop or StopSignal() as stop:
        for index, name in enumerate(config.stage_order):
            if name in progress["completed"]:
                continue
            if params is None:
                previous = [n for n in config.stage_order[:index] if n in progress["completed"]]
                params = (stage_final_params(rt, previous[-1], rt.init_params) if previous else rt.init_params)
            offset = sum(progress["completed"].values())
            params, finished = run_stage(rt, name, params, offset, stop)
            if not finished:
                rt.writer.close()
                return {"finished": False, "stages": list(progress["completed"])}
            progress["completed"][name] = _completed_steps(rt, name)
            _save_progress(rt, progress)
    if params is None:  # everything was already done
        params = stage_final_params(rt, config.stage_order[-1], rt.init_params)
    host_params = jax.tree.map(to_host, params)  # a collective under multi-process: every process gathers
    if rt.is_main:
        export_dir = os.path.join(workdir, "final_model")
        models.save_pretrained(rt.model, host_params, export_dir)
        rt.tokenizer.save_pretrained(export_dir)
        if rt.image_processor is not None:
            rt.image_processor.save_pretrained(export_dir)
    rt.writer.close()
    return {"finished": True, "stages": list(progress["completed"])}


def _completed_steps(rt: Runtime, name: str) -> int:
    with TrainCheckpointer(os.path.join(rt.workdir, "checkpoints", name), save_every=1) as ckpt:
        return int(ckpt.latest_step() or 0)
