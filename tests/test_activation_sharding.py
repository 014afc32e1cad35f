"""Under FSDP the steps keep activations split by rows: the compiled step gathers weights and never moves
[rows, T, ...] activations between devices (the all-reduce of every projection's output that an unconstrained
model gets, because its activations inherit the weights' split on the model dimension)."""

import re

import jax
import numpy as np
import pytest

from jaxvlm import models, sampling, sharding, train_steps
from jaxvlm.bench import workload

# Compiles the steps and the sampler on an 8-device mesh: outside the fast tier (`-m "not slow"`); CI runs it.
pytestmark = pytest.mark.slow

SEQ, SCORED = 88, 24  # a sequence length that no parameter dimension of the tiny preset shares
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _collective_shapes(hlo: str) -> dict[str, list[tuple[int, ...]]]:
    """Result shapes of the floating-point collectives in optimized HLO text, by kind. (Integer ones are left out:
    XLA gathers the token ids, 4 bytes a token, to look them up in the embedding table split on D.)"""
    found: dict[str, list[tuple[int, ...]]] = {k: [] for k in COLLECTIVES}
    for line in hlo.splitlines():
        m = re.search(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^ ]* (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if m and m.group(1).startswith(("f", "bf")):
            found[m.group(3)].append(tuple(int(d) for d in m.group(2).split(",") if d))
    return found


@pytest.fixture(scope="module")
def fsdp_step():
    assert jax.device_count() >= 8, "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    cfg = models.preset("tiny")
    model = models.Qwen25VL(cfg)
    mesh = sharding.make_mesh((1, 8, 1), jax.devices()[:8])
    opt = train_steps.OptimizerConfig(learning_rate=1e-3)
    abstract = models.abstract_params(cfg)
    optimizer = train_steps.make_optimizer(opt, abstract)
    state = jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, 0), abstract)
    state_sh = train_steps.state_shardings(state, mesh)
    rows = workload.make_rows(cfg, 8, SEQ, SCORED, (56, 56))
    batch = workload.sft_microbatches(cfg, rows, 1, sharding.data_parallel_size(mesh))
    step, batch_sh = train_steps.jit_step(
        train_steps.sft_step,
        mesh,
        state_sh,
        batch,
        1,
        model=model,
        optimizer=optimizer,
        schedule=train_steps.learning_rate_schedule(opt),
        cfg=train_steps.LossConfig(),
    )
    abstract_args = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), (state, batch), (state_sh, batch_sh)
    )
    return cfg, mesh, step.lower(*abstract_args).compile().as_text()


def test_no_collective_moves_activations(fsdp_step):
    cfg, _, hlo = fsdp_step
    shapes = _collective_shapes(hlo)
    moved = {kind: [s for s in found if SEQ in s] for kind, found in shapes.items()}
    assert not any(moved.values()), f"activations cross devices: {moved}"
    # FSDP itself is there: layer weights are gathered (e.g. the MLP's [D, I] kernels) ...
    t = cfg.text
    gathered = shapes["all-gather"]
    assert any(s[-2:] == (t.hidden_size, t.intermediate_size) for s in gathered), gathered
    # ... and the batch really is split: no device holds all 8 rows of an [8, SEQ, D] activation
    assert not re.search(rf"f32\[8,{SEQ},{t.hidden_size}\]", hlo)


def test_sampler_prefill_keeps_rows_split():
    cfg = models.preset("tiny")
    mesh = sharding.make_mesh((1, 8, 1), jax.devices()[:8])
    rows = workload.make_rows(cfg, 8, SEQ, 0, (56, 56))
    sh = sampling.batch_sharding(mesh)
    inputs = sampling.prepare_prompts(cfg, workload.prompt_batch(rows), slot_multiple=8)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), inputs, sampling.input_shardings(inputs, sh)
    )
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        models.abstract_params(cfg),
        sharding.tree_shardings(models.abstract_params(cfg), mesh),
    )
    sp = sampling.SamplingParams(num_generations=2, max_new_tokens=4).resolve(cfg)
    hlo = sampling.compiled_sampler(sh).lower(params, placed, jax.random.key(0), config=cfg, sp=sp).compile().as_text()
    moved = [s for found in _collective_shapes(hlo).values() for s in found if SEQ in s]
    assert not moved, f"prompt activations cross devices: {moved}"
    assert np.prod(inputs["pixel_values"].shape[:1]) % 8 == 0  # image slots split like rows
