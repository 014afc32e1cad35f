"""Multi-process (multi-controller) JAX: start-up and host-local batches.

One Python process runs per host (TPU VM worker, GPU node, or a local process for testing); each sees its local
devices and `jax.devices()` lists the devices of all of them. `initialize` starts `jax.distributed` when the run
has more than one process, from (first match wins):

1. explicit arguments / the config (`distributed.coordinator_address`, `num_processes`, `process_id`);
2. the environment variables `JAXVLM_COORDINATOR`, `JAXVLM_NUM_PROCESSES`, `JAXVLM_PROCESS_ID`
   (`launch/local_multiprocess.sh` sets them);
3. cluster auto-detection by JAX (TPU pods, SLURM, Open MPI) when the environment shows such a multi-process
   job (`launch/tpu_pod.sh`, `launch/slurm_gpu.sbatch`).

Otherwise the run is single-process and nothing happens. Every process then executes the same program; each feeds
only its own rows of a batch (`global_batch`), and Orbax checkpoints are written collectively.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

_ENV = ("JAXVLM_COORDINATOR", "JAXVLM_NUM_PROCESSES", "JAXVLM_PROCESS_ID")


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))  # a multi-worker TPU slice


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Any = None,
    *,
    auto_detect: bool = True,
) -> dict:
    """Start jax.distributed if this is a multi-process run (see the module docstring). Idempotent.

    Must run before anything touches a JAX backend. On CPU the cross-process collectives use gloo.
    Returns {"process_index", "process_count", "local_devices", "global_devices"}.
    """
    if not coordinator_address and os.environ.get(_ENV[0]):
        coordinator_address = os.environ[_ENV[0]]
        num_processes = int(os.environ.get(_ENV[1], "0"))
        process_id = int(os.environ.get(_ENV[2], "-1"))
        if num_processes < 1 or process_id < 0:
            raise ValueError(f"{_ENV[0]} is set, so {_ENV[1]} and {_ENV[2]} must be set too")
    explicit = bool(coordinator_address) and (num_processes or 0) > 1
    if explicit and not (0 <= (process_id if process_id is not None else -1) < num_processes):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if (explicit or (auto_detect and _cluster_detected())) and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
        if explicit:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
        else:
            jax.distributed.initialize()
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
    }


def local_rows(sharding, global_shape: tuple[int, ...], axis: int = 0) -> slice:
    """The contiguous range of rows (along `axis`) of a global array that this process's devices hold under
    `sharding` — the rows this process must feed to `global_batch`."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        sl = index[axis]
        starts.append(sl.start or 0)
        stops.append(global_shape[axis] if sl.stop is None else sl.stop)
    lo, hi = min(starts), max(stops)
    covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
    if covered != hi - lo:
        raise ValueError(f"this process's rows of axis {axis} are not contiguous under {sharding}")
    return slice(lo, hi)


def global_batch(local_batch: Any, shardings: Any) -> Any:
    """Assemble global jax.Arrays from each process's rows (`jax.make_array_from_process_local_data`).

    `local_batch` leaves hold this process's rows along the sharded row axis (replicated leaves — the ones whose
    sharding does not split any axis — must be the full value on every process). Single-process: a device_put.
    """
    if jax.process_count() == 1:
        return jax.device_put(local_batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_batch, shardings)


def feed_global_batch(full_batch: Any, shardings: Any) -> Any:
    """Like `global_batch`, from a host batch holding *all* rows on every process (e.g. generated from a shared
    seed): each process slices out the rows its devices hold (first split axis of each leaf's sharding)."""

    def local(x, sharding):
        x = np.asarray(x)
        spec = list(getattr(sharding, "spec", ())) + [None] * x.ndim
        axis = next((i for i in range(x.ndim) if spec[i] is not None), None)
        if axis is None or jax.process_count() == 1:
            return x
        return x[(slice(None),) * axis + (local_rows(sharding, x.shape, axis),)]

    return global_batch(jax.tree.map(local, full_batch, shardings), shardings)


def put_global(tree: Any, shardings: Any) -> Any:
    """Place a pytree whose full value every process holds (params from the same seed or checkpoint) onto
    `shardings`, which may span several processes (where `jax.device_put` refuses). Single-process: a device_put."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard on the devices
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def host_value(x: Any) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
