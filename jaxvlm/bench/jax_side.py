"""The JAX side of the benchmarks: jaxvlm's own jitted SFT step and GRPO step (sampler + update).

Each is a "side" as `jaxvlm.bench.run.interleave` runs it: `prepare()` compiles and warms up (its time is the
compile / warm-up figure), `repeat()` runs one timed repeat and returns its seconds per phase ({"step_s": ...}).
A side keeps its own state from repeat to repeat (the params it updates, the losses it saw), so the harness can
interleave its repeats with the PyTorch side's and still compare the two sequences of steps.

The model is what `models.build_model` returns for the config: `Qwen25VL` or its subclass `Qwen3VL` (the same
methods), so the annotations name the base class.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import sampling, sharding, train_steps
from jaxvlm.bench import workload
from jaxvlm.models.qwen2_5_vl import Qwen25VL


def _optimizer_config(opt) -> train_steps.OptimizerConfig:
    """AdamW at a constant learning rate (the PyTorch side builds the same from the same fields)."""
    return train_steps.OptimizerConfig(
        learning_rate=opt.learning_rate,
        schedule="constant",
        warmup_steps=0,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm,
    )


def _state(model, params, opt, mesh):
    """A fresh train state on the mesh. The params are copied: the steps donate their state, and the caller's params
    must outlive this benchmark (the next section starts from them)."""
    ocfg = _optimizer_config(opt)
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    optimizer = train_steps.make_optimizer(ocfg, params)
    schedule = train_steps.learning_rate_schedule(ocfg)
    state = train_steps.create_train_state(params, optimizer, 0)
    state_sh = train_steps.state_shardings(state, mesh)
    return jax.device_put(state, state_sh), state_sh, optimizer, schedule


class Sft:
    """jaxvlm's jitted SFT step, again and again on one batch. `prepare()` compiles the step and runs the first update
    (its loss is the initial params'); `repeat()` runs one more and returns its seconds. `losses` / `grad_norms`:
    every step's, before its update, the first included."""

    def __init__(self, model: Qwen25VL, params, rows: workload.Rows, *, micro_batches: int, opt, mesh):
        self.state, state_sh, optimizer, schedule = _state(model, params, opt, mesh)
        mb = workload.sft_microbatches(model.config, rows, micro_batches, sharding.data_parallel_size(mesh))
        self._step, batch_sh = train_steps.jit_step(
            train_steps.sft_step,
            mesh,
            state_sh,
            mb,
            1,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            cfg=train_steps.LossConfig(),
        )
        self._batch = jax.device_put(mb, batch_sh)
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def prepare(self) -> None:
        self._step = self._step.lower(self.state, self._batch).compile()
        self._update()

    def repeat(self) -> dict[str, float]:
        start = time.perf_counter()
        self._update()
        return {"step_s": time.perf_counter() - start}

    def _update(self) -> None:
        self.state, metrics = self._step(self.state, self._batch)
        self.losses.append(float(metrics["loss"]))  # blocks on the step
        self.grad_norms.append(float(metrics["grad_norm"]))


def _prefill_fn(model: Qwen25VL):
    def prefill(p, x):
        return model.apply(
            {"params": p},
            x["input_ids"],
            x["attention_mask"],
            x.get("pixel_values"),
            None,
            x["position_ids"],
            vision_inputs=x.get("vision_inputs"),
            method="prefill",
        )

    return jax.jit(prefill)


class Grpo:
    """jaxvlm's GRPO step end to end on the same prompts: rollout (`sampling.generate`), host reward, update
    (`train_steps.grpo_step`). `prepare()` runs the first step, which compiles the sampler and the update (and the
    prompt forward timed apart); `first` keeps that step's update rows, loss and gradient norm (the initial params':
    the parity batch). `repeat()` times the prompt forward alone (`prefill_s`, for the rollout's prefill / decode
    split), then one more step and its phases."""

    def __init__(
        self,
        model: Qwen25VL,
        params,
        rows: workload.Rows,
        *,
        num_generations: int,
        max_new_tokens: int,
        micro_batches: int,
        opt,
        mesh,
    ):
        self.model, self.mesh = model, mesh
        self.g, self.n, self.micro_batches = num_generations, max_new_tokens, micro_batches
        self.state, self._state_sh, self._optimizer, self._schedule = _state(model, params, opt, mesh)
        self._prompts = workload.prompt_batch(rows)
        self._inputs = sampling.prepare_prompts(model.config, self._prompts)  # the prompts do not change
        self._rows = rows
        self._prefill = _prefill_fn(model)
        self._update = self._batch_sh = None  # compiled by the first step, on its batch
        self._steps = 0
        self.first: dict = {}

    def prepare(self) -> None:
        jax.block_until_ready(self._prefill(self.state.params, self._inputs))
        _, update_rows, metrics = self._step()
        self.first = {"rows": update_rows, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}

    def repeat(self) -> dict[str, float]:
        start = time.perf_counter()
        jax.block_until_ready(self._prefill(self.state.params, self._inputs))
        prefill_s = time.perf_counter() - start
        phases, _, _ = self._step()
        return {"prefill_s": prefill_s, **phases}

    def _step(self):
        """One rollout + reward + update (the first call compiles the update, outside its phases' times)."""
        g, key = self.g, jax.random.key(self._steps)
        self._steps += 1
        t0 = time.perf_counter()
        rollout = sampling.generate(
            self.model,
            self.state.params,
            self._prompts,
            key,
            sampling.SamplingParams(num_generations=g, max_new_tokens=self.n, temperature=1.0, use_eos=False),
            mesh=self.mesh,
        )
        rollout = jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        host = jax.tree.map(np.asarray, rollout)
        update_rows, mb = workload.grpo_update_batch(
            self.model.config,
            self._rows,
            self._inputs,
            host,
            g,
            self.micro_batches,
            sharding.data_parallel_size(self.mesh),
        )
        t2 = time.perf_counter()
        if self._update is None:
            fn, self._batch_sh = train_steps.jit_step(
                train_steps.grpo_step,
                self.mesh,
                self._state_sh,
                mb,
                2,
                model=self.model,
                optimizer=self._optimizer,
                schedule=self._schedule,
                cfg=train_steps.LossConfig(group_size=g),
            )
            self._update = fn.lower(self.state, jax.device_put(mb, self._batch_sh)).compile()
        t3 = time.perf_counter()
        self.state, metrics = self._update(self.state, jax.device_put(mb, self._batch_sh))
        metrics = jax.block_until_ready(metrics)
        t4 = time.perf_counter()
        phases = {
            "rollout_s": t1 - t0,
            "reward_s": t2 - t1,
            "update_s": t4 - t3,
            "step_s": (t1 - t0) + (t2 - t1) + (t4 - t3),
        }
        return phases, update_rows, metrics


def default_mesh(shape=(1, -1, 1)):
    """The benchmark's mesh, as the trainer builds it from `mesh.shape` (a shape without -1 may use the first
    devices only, e.g. (1, 1, 1) on a multi-device host)."""
    from jaxvlm.runtime import build_mesh

    return build_mesh(shape)
