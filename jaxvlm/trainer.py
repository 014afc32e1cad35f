"""The training loop: `run(config, workdir)` runs a recipe's stages in order; each stage's mode
(`jaxvlm.stages`) supplies its keys, its checks, its step and the batch of each loop step.

    spec <- configuration.resolve(config)        (every check, before anything is built)
    setup: tokenizer, model, image processor, mesh
    for each stage in order (skipping completed ones, resuming a partial one):
        params <- the previous stage's final params; the KL reference <- these params (re-anchored per stage)
        mode.prepare (rejection sampling); plan (length, optimizer schedule)
        each step: mode.update_batch (SFT micro-batches, or rollouts -> rewards -> update rows) -> jitted step;
        metrics (JSONL + TensorBoard + progress bar), evaluation every eval_every steps and at the end,
        checkpoints every save_every steps; SIGTERM/SIGINT -> checkpoint and clean exit; K consecutive non-finite
        updates -> stop with the step and the quantity
        (an eval stage evaluates and writes its summary instead)
    export the final params as a Hugging Face checkpoint (workdir/final_model) when a stage trained

Layout of `workdir`: `checkpoints/<stage>/<step>/` (Orbax: train state, KL reference, data-iterator state;
`<step>.damaged/`: a damaged step set aside, see jaxvlm.checkpoint), `progress.json` (completed training stages; eval
stages run on every run), `metrics.jsonl`, `tensorboard/`, `eval_completions/`, `eval/<stage>/`,
`rejection/<stage>/kept.jsonl`, `tokenizer/` (the built-in tokenizer), `final_model/`, `train.lock` (while a trainer
runs: its pid@host and start time), `environment.json` (what the numbers depend on besides the config: versions,
devices, CPUs; jaxvlm.reproducibility). Re-running the same command resumes.

Data is read as the *global* batch on every process (each process decodes and scores every rollout, so rewards
and advantages agree everywhere) and fed to the devices with `distributed.feed_global_batch`.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxvlm import configuration, distributed, evaluation, models, rollouts, runtime, stages, train_steps
from jaxvlm.checkpoint import CheckpointError, TrainCheckpointer, abstract_like
from jaxvlm.configuration import StageSpec
from jaxvlm.data import pipeline, sources
from jaxvlm.metrics import ProgressBar, StepTimer
from jaxvlm.models import lora
from jaxvlm.runtime import Runtime, StopSignal

__all__ = ["StopSignal", "TrainingDiverged", "run", "run_stage"]


class TrainingDiverged(RuntimeError):
    """K consecutive updates were skipped because a quantity went non-finite."""


def run(config, workdir: str, stop: StopSignal | None = None) -> dict:
    """Run (or resume) every stage of `config` in `workdir`. Returns {"finished": bool, "stages": [...]}.

    `stop`: what says "checkpoint and exit" between steps (default: SIGTERM / SIGINT). A second trainer on the same
    workdir is refused (runtime.WorkdirError naming the holder) until this one returns or raises.
    """
    spec = configuration.resolve(config)
    configuration.check_files(spec)
    configuration.check_devices(spec, jax.device_count())
    runtime.check_lora(spec)
    runtime.check_frozen_patterns(spec)
    with runtime.workdir_lock(workdir):
        progress = runtime.load_progress(workdir)
        return run_stages(runtime.setup(spec, workdir), spec, progress, stop)


def run_stages(rt: Runtime, spec: configuration.RunSpec, progress: dict, stop: StopSignal | None) -> dict:
    params = None
    with stop or StopSignal() as stop:
        for index, stage in enumerate(spec.stages):
            if stage.name in progress["completed"]:
                continue
            if params is None:
                params = starting_params(rt, spec.stages[:index])
            offset = sum(progress["completed"].values())
            params, finished = run_stage(rt, stage, params, offset, stop)
            if not finished:
                rt.writer.close()
                return {"finished": False, "stages": list(progress["completed"])}
            if stages.get(stage.mode).trains:  # an eval stage runs again on a re-run: its model may have changed
                progress["completed"][stage.name] = completed_steps(rt, stage)
                runtime.save_progress(rt, progress)
    if spec.trains:
        export_final_model(rt, params if params is not None else starting_params(rt, spec.stages))
    rt.writer.close()
    return {"finished": True, "stages": list(progress["completed"])}


def run_stage(rt: Runtime, spec: StageSpec, params, global_offset: int, stop: StopSignal) -> tuple[Any, bool]:
    """Run (or resume) one stage from `params`. Returns (final params, finished: False when stopped by a signal)."""
    mode = stages.get(spec.mode)
    if not mode.trains:
        mode.run(rt, spec, params, global_offset)
        return params, True
    spec = mode.prepare(rt, spec, params)
    with StageRun(rt, mode, stages.plan(mode, spec), params, global_offset) as stage_run:
        return stage_run.loop(stop)


def starting_params(rt: Runtime, earlier: tuple[StageSpec, ...]):
    """The params a stage starts from: the last training stage's final checkpoint before it, else the initial."""
    trained = [s for s in earlier if stages.get(s.mode).trains]
    return stage_final_params(rt, trained[-1], rt.init_params) if trained else rt.init_params


def export_final_model(rt: Runtime, params) -> None:
    host_params = jax.tree.map(distributed.host_value, params)  # a collective under multi-process
    if rt.is_main:
        export_dir = os.path.join(rt.workdir, "final_model")
        models.save_pretrained(rt.model, host_params, export_dir)  # LoRA adapters merged into the weights
        if lora.has_adapters(host_params):
            lora.save_peft_adapter(
                rt.model.config, host_params, os.path.join(rt.workdir, "final_adapter"), rt.model_source
            )
        rt.tokenizer.save_pretrained(export_dir)
        if rt.image_processor is not None:
            rt.image_processor.save_pretrained(export_dir)


# ----------------------------------------------------------------------------------------------------------
# State and checkpoints
# ----------------------------------------------------------------------------------------------------------


def fresh_state(rt: Runtime, optimizer_cfg: train_steps.OptimizerConfig, params):
    """The stage's optimizer and a train state born sharded on the mesh (also across processes)."""
    optimizer = train_steps.make_optimizer(optimizer_cfg, params)
    seed = rt.seed

    def init(p):
        return train_steps.create_train_state(p, optimizer, jax.random.key(seed))

    shardings = train_steps.state_shardings(jax.eval_shape(init, params), rt.mesh)
    params = distributed.put_global(params, shardings.params)
    state = jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)
    return optimizer, state, shardings


def checkpoint_tree(state, ref_params):
    """What a stage checkpoint holds: the train state and the KL reference's `reference_tree`. With LoRA adapters
    the state's params are the adapters alone: the frozen base is the run's `model.path` (or preset) weights, read
    again on resume, and the optimizer state covers the adapters only."""
    if lora.has_adapters(state.params):
        state = state.replace(params=lora.adapters_of(state.params))
    return {"state": state} if ref_params is None else {"state": state, "ref_params": ref_params}


def reference_tree(params):
    """What a stage keeps of its starting params as the KL reference: all of them, or with LoRA only the adapters
    (the base they sit on is frozen, so the state's own base arrays serve the reference: no second copy)."""
    return lora.adapters_of(params) if lora.has_adapters(params) else params


def with_base(adapters, params):
    """`adapters` on the base weights of `params` (a LoRA checkpoint's params are its adapters alone)."""
    return lora.join(adapters, lora.without_adapters(params)) if lora.has_adapters(params) else adapters


def stage_checkpointer(rt: Runtime, spec: StageSpec, save_every: int = 1, keep: int | None = None):
    return TrainCheckpointer(os.path.join(rt.workdir, "checkpoints", spec.name), save_every=save_every, keep=keep)


def stage_final_params(rt: Runtime, spec: StageSpec, params_template):
    """The last checkpointed params of a completed stage (to start the next stage after a restart). When its final
    checkpoint is damaged the stage is marked unfinished in progress.json and CheckpointError says to re-run."""
    optimizer = train_steps.make_optimizer(spec.optimizer, params_template)
    state = jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, jax.random.key(0)), params_template)
    shardings = train_steps.state_shardings(state, rt.mesh)
    ref = reference_tree(state.params) if spec.loss.beta > 0 else None
    tree = checkpoint_tree(state, ref)
    tree_sh = checkpoint_tree(shardings, None if ref is None else reference_tree(shardings.params))
    with stage_checkpointer(rt, spec) as ckpt:
        restored, _, _ = ckpt.restore(abstract_like(tree, tree_sh))
        if ckpt.set_aside:
            progress = runtime.load_progress(rt.workdir)
            progress["completed"].pop(spec.name, None)
            runtime.save_progress(rt, progress)
            raise final_checkpoint_damaged(spec, ckpt)
    return with_base(restored["state"].params, params_template)


def completed_steps(rt: Runtime, spec: StageSpec) -> int:
    """The step count of a stage that just finished, from its newest checkpoint, checked intact."""
    with stage_checkpointer(rt, spec) as ckpt:
        step = ckpt.newest_intact_step()
        if ckpt.set_aside:
            raise final_checkpoint_damaged(spec, ckpt)
        return int(step or 0)


def final_checkpoint_damaged(spec: StageSpec, ckpt: TrainCheckpointer) -> CheckpointError:
    damaged = "; ".join(f"{d.describe()} (moved to {d.moved_to})" for d in ckpt.set_aside)
    return CheckpointError(
        f"stage {spec.name!r} finished, but its final checkpoint is damaged: {damaged}. The stage is not marked done: "
        f"re-run the same command to resume it from its newest intact step, {ckpt.latest_step()}, to its end"
    )


# ----------------------------------------------------------------------------------------------------------
# One training stage
# ----------------------------------------------------------------------------------------------------------


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.tree.map(distributed.host_value, metrics).items()}


def nonfinite(metrics: dict[str, float], keys=("loss", "grad_norm", "reward", "advantage_abs_max")) -> list[str]:
    return [f"{k}={metrics[k]}" for k in keys if k in metrics and not math.isfinite(metrics[k])]


class StageRun:
    """One training stage: its state (fresh, or restored from its checkpoints), data iterator, jitted step and
    bookkeeping. `loop` runs it to the end or to a stop signal."""

    def __init__(self, rt: Runtime, mode: stages.StageMode, plan: stages.StagePlan, params, global_offset: int):
        self.rt, self.mode, self.plan, self.offset = rt, mode, plan, global_offset
        self.spec = plan.spec
        self.optimizer, self.state, self.state_sh = fresh_state(rt, plan.optimizer, params)
        self.schedule = train_steps.learning_rate_schedule(plan.optimizer)
        # The KL reference is re-anchored to the stage's start; a copy, because the step donates the state's buffers.
        # With LoRA only the adapters are copied (`reference_params`).
        beta = self.spec.loss.beta > 0
        self.ref_params = jax.tree.map(jnp.copy, reference_tree(self.state.params)) if beta else None
        self.ref_is_base = None  # the reference adapters are all zero: `reference_params`
        self.ref_logprobs = (
            rollouts.reference_logprobs_fn(rt.model, len(plan.leading), self.spec.loss.temperature) if beta else None
        )
        t = rt.spec.train
        self.ckpt = stage_checkpointer(rt, self.spec, t.save_every, t.keep_checkpoints)
        self.iterator = iter(sources.input_pipeline(plan.data(), rt.tokenizer, rt.image_processor, rt.model_config))
        self.start, self.skipped_totals = 0, None
        self.compiled = self.batch_sh = None
        self.consecutive_skips = 0
        self.timer = StepTimer()
        self.key = jax.random.fold_in(jax.random.key(rt.seed), zlib.crc32(self.spec.name.encode()))
        self._restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ckpt.wait_until_finished()
        self.ckpt.close()
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

    def _restore(self) -> None:
        if self.ckpt.latest_step() is None:
            return
        ref_sh = None if self.ref_params is None else reference_tree(self.state_sh.params)
        restored, data_state, _ = self.ckpt.restore(
            abstract_like(checkpoint_tree(self.state, self.ref_params), checkpoint_tree(self.state_sh, ref_sh)),
            required_items={"data_state": ("iterator", "stage_step", "skipped")},
        )
        state = restored["state"]
        self.state = state.replace(params=with_base(state.params, self.state.params))
        self.ref_params = restored.get("ref_params")
        self.iterator.set_state(data_state["iterator"])
        self.start, self.skipped_totals = int(data_state["stage_step"]), data_state["skipped"]
        logging.info("stage %s: resumed at step %d", self.spec.name, self.start)
        if self.ckpt.set_aside:  # damaged newer steps were skipped (each logged with its files)
            damaged = {"restore_fallbacks": len(self.ckpt.set_aside), "stage": self.spec.name}
            damaged["damaged_steps"] = ",".join(str(d.step) for d in self.ckpt.set_aside)
            self.rt.writer.write(self.offset + self.start, damaged, prefix="checkpoint/")

    def _data_state(self, done: int) -> dict:
        return {"iterator": self.iterator.get_state(), "stage_step": done, "skipped": self.skipped_totals}

    def loop(self, stop: StopSignal) -> tuple[Any, bool]:
        """Steps from the resumed step to the stage's end; (params, finished)."""
        if self.start >= self.plan.steps:
            return self.state.params, True
        rt, done = self.rt, self.start
        bar = ProgressBar(
            self.plan.steps, desc=f"[{self.spec.name}] {self.spec.mode}", enabled=rt.spec.train.progress and rt.is_main
        )
        try:
            for step in range(self.start, self.plan.steps):
                try:
                    batch = next(self.iterator)
                except StopIteration:
                    break
                metrics = self.train_step(batch, step)
                done = step + 1
                self.record(metrics, done, bar)
                stopping = stop.requested()
                self.ckpt.save(
                    done,
                    checkpoint_tree(self.state, self.ref_params),
                    data_state=self._data_state(done),
                    force=stopping,
                )
                if stopping:
                    logging.warning(
                        "stage %s: stopped by signal after step %d; checkpoint written", self.spec.name, done
                    )
                    return self.state.params, False
        finally:
            bar.close()
        rt.writer.write(self.offset + done, {**self.timer.summary(), "stage": self.spec.name}, prefix="time/")
        self.evaluate(self.offset + done)
        self.ckpt.save(
            done, checkpoint_tree(self.state, self.ref_params), force=True, data_state=self._data_state(done)
        )
        return self.state.params, True

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        """The mode's batch for this step, the reference log-probs (with a KL term), the jitted update; metrics."""
        self.skipped_totals = pipeline.add_skip_counts(self.skipped_totals, batch)
        self.timer.start()
        mb, host_metrics = self.mode.update_batch(
            self.rt, self.plan, self.state.params, batch, jax.random.fold_in(self.key, step), self.draw
        )
        if self.ref_logprobs is not None:
            mb["ref_logp"] = np.zeros_like(mb["old_logp"])  # filled on the device below
        if self.compiled is None:
            self.compiled, self.batch_sh = train_steps.jit_step(
                self.mode.step,
                self.rt.mesh,
                self.state_sh,
                mb,
                len(self.plan.leading),
                model=self.rt.model,
                optimizer=self.optimizer,
                schedule=self.schedule,
                cfg=self.spec.loss,
            )
        device_mb = distributed.feed_global_batch(mb, self.batch_sh)
        if self.ref_logprobs is not None:
            device_mb["ref_logp"] = jax.device_put(
                self.ref_logprobs(self.reference_params(), device_mb), self.batch_sh["ref_logp"]
            )
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, device_mb)
        metrics = {**scalars(metrics), **host_metrics}
        if metrics.get("reference_tokens_sum", 0) > 0:  # DyME memorisation rows' token NLL
            metrics["dyme/reference_nll"] = metrics["reference_nll_sum"] / metrics["reference_tokens_sum"]
        metrics["time/update_s"] = time.perf_counter() - start
        metrics["time/step_s"] = self.timer.stop()
        metrics.update(pipeline.skip_metrics(self.skipped_totals))
        self.check_finite(metrics, step)
        return metrics

    def reference_params(self):
        """The KL reference's params: the stage's starting params, or with LoRA the stage's starting adapters on
        the state's own (frozen) base arrays. Adapters that start at zero (a first stage: B = 0) are dropped, so
        the reference is the base model itself and its forward pays nothing for them."""
        if not lora.has_adapters(self.state.params):
            return self.ref_params
        base = lora.without_adapters(self.state.params)
        if self.ref_is_base is None:
            self.ref_is_base = lora.adapters_are_zero(self.ref_params)
        return base if self.ref_is_base else lora.join(self.ref_params, base)

    def draw(self) -> dict | None:
        """The stage's next data batch for a mode that samples more than one per step (grpo's dynamic sampling),
        its skipped records added to the totals; None when finite data has run out. The iterator state saved after
        the step covers it, so a resumed run draws what an uninterrupted one would."""
        try:
            batch = next(self.iterator)
        except StopIteration:
            return None
        self.skipped_totals = pipeline.add_skip_counts(self.skipped_totals, batch)
        return batch

    def check_finite(self, metrics: dict[str, float], step: int) -> None:
        """Count consecutive skipped (non-finite) updates; too many -> TrainingDiverged."""
        problems = nonfinite(metrics)
        limit = self.rt.spec.train.max_consecutive_skips
        if metrics.get("update_skipped", 0) > 0:
            self.consecutive_skips += 1
            if self.consecutive_skips >= limit:
                raise TrainingDiverged(
                    f"stage {self.spec.name!r} step {step + 1}: {self.consecutive_skips} consecutive updates skipped; "
                    f"non-finite {', '.join(problems) or 'gradient'} (train.max_consecutive_skips={limit}); params "
                    "are those of the last finite update"
                )
            logging.warning(
                "stage %s step %d: update skipped (non-finite %s)",
                self.spec.name,
                step + 1,
                ", ".join(problems) or "gradient",
            )
        else:
            self.consecutive_skips = 0
        metrics["skipped_updates/consecutive"] = float(self.consecutive_skips)

    def record(self, metrics: dict[str, float], done: int, bar: ProgressBar) -> None:
        """Log (every log_every steps and at the end), advance the bar, evaluate every eval_every steps."""
        t = self.rt.spec.train
        if done % t.log_every == 0 or done == self.plan.steps:
            self.rt.writer.write(
                self.offset + done, {**metrics, "stage_step": done, "stage": self.spec.name}, prefix="train/"
            )
        bar.update(done, metrics)
        if t.eval_every and done % t.eval_every == 0 and done < self.plan.steps:
            self.evaluate(self.offset + done)

    def evaluate(self, global_step: int) -> None:
        """Evaluate the current params; log eval/* at `global_step`; write this evaluation's completions."""
        task = evaluation.task_for_stage(self.rt.spec.eval, self.spec)
        metrics = evaluation.evaluate(
            self.rt, self.state.params, task, evaluation.completions_path(self.rt.workdir, self.spec.name, global_step)
        )
        self.rt.writer.write(global_step, {**metrics, "stage": self.spec.name}, prefix="eval/")
