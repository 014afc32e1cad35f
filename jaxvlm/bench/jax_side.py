"""The JAX side of the benchmarks: jaxvlm's own jitted SFT step, GRPO step (sampler + update) and prefill.

Every function returns plain floats (seconds, losses) so the harness can put them next to the PyTorch side's.
Compile time is measured apart: a step is lowered and compiled explicitly before the timed calls.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import batching, losses, sampling, train_steps
from jaxvlm.bench import workload
from jaxvlm.bench.decode import _median_time
from jaxvlm.models.qwen2_5_vl import Qwen25VL


def _optimizer_config(opt) -> train_steps.OptimizerConfig:
    """AdamW at a constant learning rate (the PyTorch side builds the same from the same fields)."""
    return train_steps.OptimizerConfig(learning_rate=opt.learning_rate, schedule="constant", warmup_steps=0,
                                       weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm)


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


def sft(model: Qwen25VL, params, rows: workload.Rows, *, micro_batches: int, steps: int, opt, mesh) -> dict:
    """Compile, then run 1 + `steps` SFT updates on the same batch. Returns compile_s (with the first call's extra
    time), step_s (median of the last `steps`), the loss and gradient norm of every step (before its update)."""
    state, state_sh, optimizer, schedule = _state(model, params, opt, mesh)
    mb = workload.sft_microbatches(model.config, rows, micro_batches)
    step, batch_sh = train_steps.jit_step(train_steps.sft_step, mesh, state_sh, mb, 1, model=model,
                                          optimizer=optimizer, schedule=schedule, cfg=train_steps.LossConfig())
    device_mb = jax.device_put(mb, batch_sh)
    start = time.perf_counter()
    compiled = step.lower(state, device_mb).compile()
    compile_s = time.perf_counter() - start
    losses_, norms, times = [], [], []
    for _ in range(steps + 1):  # the first call is timed apart (first-call overheads), not in the median
        t0 = time.perf_counter()
        state, metrics = compiled(state, device_mb)
        loss = float(metrics["loss"])  # blocks on the step
        times.append(time.perf_counter() - t0)
        losses_.append(loss)
        norms.append(float(metrics["grad_norm"]))
    return {"compile_s": compile_s + times[0] - statistics.median(times[1:]), "step_s": statistics.median(times[1:]),
            "step_times": times[1:], "losses": losses_, "grad_norms": norms}


def _prefill_fn(model: Qwen25VL):
    def prefill(p, x):
        return model.apply({"params": p}, x["input_ids"], x["attention_mask"], x.get("pixel_values"), None,
                           x["position_ids"], vision_inputs=x.get("vision_inputs"), method=Qwen25VL.prefill)

    return jax.jit(prefill)


def prefill_seconds(model: Qwen25VL, params, prompts: dict, repeats: int) -> tuple[float, float]:
    """(compile_s, median seconds) of the prompt forward that fills the KV cache."""
    inputs = sampling.prepare_prompts(model.config, prompts)
    fn = _prefill_fn(model)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, inputs))
    compile_s = time.perf_counter() - start
    return compile_s, _median_time(lambda: jax.block_until_ready(fn(params, inputs)), repeats)


def grpo(model: Qwen25VL, params, rows: workload.Rows, *, num_generations: int, max_new_tokens: int,
         micro_batches: int, steps: int, opt, mesh, repeats: int = 3) -> dict:
    """`steps` end-to-end GRPO steps (rollout, host reward, update) on the same prompts, after one warm-up step
    that compiles. Reports medians of each phase, the prefill alone, and the first step's loss and its batch."""
    state, state_sh, optimizer, schedule = _state(model, params, opt, mesh)
    prompts = workload.prompt_batch(rows)
    g = num_generations
    prefill_compile_s, prefill_s = prefill_seconds(model, state.params, prompts, repeats)
    update = None
    phases: dict[str, list[float]] = {"rollout_s": [], "reward_s": [], "update_s": [], "step_s": []}
    first: dict = {}
    compile_s = 0.0
    row_pixels = rows.row_pixels()
    inputs = sampling.prepare_prompts(model.config, prompts)  # the prompts do not change between steps
    for i in range(steps + 1):  # step 0 is the warm-up: it compiles, and its loss is the initial params' loss
        t0 = time.perf_counter()
        rollout = sampling.generate(model, state.params, prompts, jax.random.key(i), num_generations=g,
                                    max_new_tokens=max_new_tokens, temperature=1.0, use_eos=False, mesh=mesh)
        rollout = jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        host = jax.tree.map(np.asarray, rollout)
        update_rows = sampling.update_rows(inputs, host, g)
        rewards = workload.token_parity_reward(host.tokens, host.mask)
        update_rows["advantages"] = np.asarray(
            losses.group_advantages(jnp.asarray(rewards), g, scale="group")).astype(np.float32)
        mb = batching.microbatches(update_rows, (1, micro_batches),
                                   row_pixels=None if row_pixels is None else batching.repeat_rows(row_pixels, g),
                                   vision_config=model.config.vision)
        t2 = time.perf_counter()
        if update is None:
            fn, batch_sh = train_steps.jit_step(train_steps.grpo_step, mesh, state_sh, mb, 2, model=model,
                                                optimizer=optimizer, schedule=schedule,
                                                cfg=train_steps.LossConfig(group_size=g))
            update = fn.lower(state, jax.device_put(mb, batch_sh)).compile()
            compile_s += time.perf_counter() - t2
        t3 = time.perf_counter()
        state, metrics = update(state, jax.device_put(mb, batch_sh))
        loss = float(metrics["loss"])  # blocks on the update
        t4 = time.perf_counter()
        if i == 0:
            first = {"rows": update_rows, "loss": loss, "grad_norm": float(metrics["grad_norm"])}
            compile_s += t1 - t0  # the warm-up rollout's time is mostly the sampler's compile
            continue
        phases["rollout_s"].append(t1 - t0)
        phases["reward_s"].append(t2 - t1)
        phases["update_s"].append(t4 - t3)
        phases["step_s"].append((t1 - t0) + (t2 - t1) + (t4 - t3))
    out = {k: statistics.median(v) for k, v in phases.items()}
    out.update(prefill_s=prefill_s, compile_s=compile_s + prefill_compile_s, first_loss=first["loss"],
               first_grad_norm=first["grad_norm"], first_rows=first["rows"], tokens=int(first["rows"]["prompt_mask"].sum()
                                                    + first["rows"]["completion_mask"].sum()))
    return out


def default_mesh(shape=(1, -1, 1)):
    """The benchmark's mesh, as the trainer builds it from `mesh.shape` (a shape without -1 may use the first
    devices only, e.g. (1, 1, 1) on a multi-device host)."""
    from jaxvlm.trainer import _mesh

    return _mesh(shape)
