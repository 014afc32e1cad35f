"""Two SFT + GRPO steps of the tiny model on a (2, 4, 1) mesh: run by test_distributed in one process with 8
devices, and as 2 processes x 4 CPU devices (`python tests/multihost_worker.py PID NPROC PORT OUT`)."""

import os
import sys


def run_steps(mesh_shape=(2, 4, 1)):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxvlm import distributed, models, sharding, train_steps
    from test_train_steps import MODEL, policy_batch

    opt_cfg = train_steps.OptimizerConfig(learning_rate=1e-3, total_steps=10)
    abstract = jax.eval_shape(lambda: models.init_params(models.preset("tiny"), 0))
    optimizer = train_steps.make_optimizer(opt_cfg, abstract)
    schedule = train_steps.learning_rate_schedule(opt_cfg)
    init = lambda: train_steps.create_train_state(models.init_params(models.preset("tiny"), 0), optimizer, 0)  # noqa: E731
    mesh = sharding.make_mesh(mesh_shape)
    state_sh = train_steps.state_shardings(jax.eval_shape(init), mesh)
    state = jax.jit(init, out_shardings=state_sh)()  # born sharded, the same on every process
    cfg = train_steps.LossConfig(num_iterations=2)
    metrics = {}
    for step_fn, lead, batch in (
        (train_steps.sft_step, 1, policy_batch((2,), 8, seed=5)),
        (train_steps.grpo_step, 2, policy_batch((1, 2), 8, seed=6)),
    ):
        fn, batch_sh = train_steps.jit_step(
            step_fn, mesh, state_sh, batch, lead, model=MODEL, optimizer=optimizer, schedule=schedule, cfg=cfg
        )
        state, m = fn(state, distributed.feed_global_batch(batch, batch_sh))
        metrics[step_fn.__name__] = {k: float(v) for k, v in m.items()}
    params = multihost_utils.process_allgather(state.params, tiled=True)
    return jax.tree.map(np.asarray, params), metrics


if __name__ == "__main__":
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from jaxvlm import distributed

    info = distributed.initialize(f"localhost:{port}", nproc, pid)
    assert info["global_devices"] == 4 * nproc, info
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    params, metrics = run_steps()
    if pid == 0:
        flat = {
            "/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        np.savez(out, **flat)
        import json

        with open(out + ".json", "w") as f:
            json.dump(metrics, f)
    jax.distributed.shutdown()
