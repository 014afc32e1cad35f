"""Training checkpoints: a small wrapper over ``orbax.checkpoint.CheckpointManager``.

What is saved, per step, in ``<directory>/<step>/``:

* ``state/``: the training state, any pytree of jax arrays (params, optax optimizer state, step counter,
  typed PRNG keys). Typed keys (``jax.random.key``) are stored as their raw ``jax.random.key_data`` and
  re-wrapped on restore, so callers always pass and get typed keys.
* ``data_state/`` (optional): a JSON-serialisable dict, e.g. a grain iterator's ``get_state()``.
* ``config/`` (optional): a JSON-serialisable dict, e.g. ``ConfigDict.to_dict()``.

JSON items come back as JSON types (tuples become lists). Saves happen when ``step % save_every == 0``
(or with ``force=True``: on SIGTERM, at the end of training), only the last ``keep`` steps are kept, and
saves are asynchronous by default: arrays are copied to host before ``save`` returns, the disk write
continues in the background; ``wait_until_finished()`` / ``close()`` wait for it.

Resuming::

    ckpt = TrainCheckpointer(workdir, save_every=500)
    state = init_state(...)                                  # or jax.eval_shape(init_state, ...)
    if ckpt.latest_step() is not None:
        abstract = abstract_like(state, shardings)           # target shardings on the *current* mesh
        state, data_state, config = ckpt.restore(abstract)
        data_iter.set_state(data_state)
    for step in range(int(state["step"]), num_steps):
        state = train_step(state, next(data_iter))
        ckpt.save(step + 1, state, data_state=data_iter.get_state())
    ckpt.save(num_steps, state, data_state=data_iter.get_state(), force=True)
    ckpt.close()

Restoring reshards onto whatever shardings ``abstract_state`` carries, so a checkpoint written from 8
devices can be read onto 1 and vice versa. Under multi-process JAX (``jax.distributed``) every process
must call ``save``, ``restore``, ``wait_until_finished`` and ``close`` with the same arguments: Orbax
coordinates the processes and writes each array shard once.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_JSON_ITEMS = ("data_state", "config")


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(dtype) -> Any:
    """The PRNG implementation of a key dtype, read through the public ``jax.random.key_impl``."""
    impl = []
    jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), jax.ShapeDtypeStruct((), dtype))
    return impl[0]


def _unwrap_keys(state):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract_key_data(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """Abstract key array -> abstract key data (trailing dims unsharded)."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.NamedSharding(sharding.mesh, jax.P(*sharding.spec, *[None] * (data.ndim - x.ndim)))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def abstract_like(state, shardings=None):
    """Pytree of ``jax.ShapeDtypeStruct`` mirroring ``state`` (arrays or abstract arrays).

    ``shardings``: None keeps each leaf's own sharding; a single ``jax.sharding.Sharding`` applies to every
    leaf; otherwise a pytree of shardings with the structure of ``state``.
    """
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, state)
    elif isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class TrainCheckpointer:
    """Periodic, asynchronous, bounded-retention checkpoints of (state, data_state, config)."""

    def __init__(self, directory, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save, create=True
        )
        # Registering the handlers up front lets a fresh manager (after a restart) read step metadata.
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.handlers.StandardCheckpointHandler(),
            **{name: ocp.handlers.JsonCheckpointHandler() for name in _JSON_ITEMS},
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(
        self, step: int, state, *, data_state: dict | None = None, config: dict | None = None, force: bool = False
    ) -> bool:
        """Saves ``step`` if it is on the interval (or ``force``); returns whether a save was started.

        A step that is already saved is never overwritten (returns False).
        """
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        items = dict(state=ocp.args.StandardSave(_unwrap_keys(state)))
        for name, value in zip(_JSON_ITEMS, (data_state, config)):
            if value is not None:
                items[name] = ocp.args.JsonSave(value)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict | None, dict | None]:
        """Restores ``(state, data_state, config)`` of ``step`` (default: the latest).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (see ``abstract_like``) whose shardings say
        where the arrays go; missing JSON items come back as None.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint found in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available steps: {steps}")
        saved = set(self._manager.metadata(step).item_handlers or ())  # item names written at this step
        abstract_data = jax.tree.map(lambda x: _abstract_key_data(x) if _is_key(x) else x, abstract_state)
        items = dict(state=ocp.args.StandardRestore(abstract_data))
        items.update({name: ocp.args.JsonRestore() for name in _JSON_ITEMS if name in saved})
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = jax.tree.map(
            lambda a, x: jax.random.wrap_key_data(x, impl=_key_impl(a.dtype)) if _is_key(a) else x,
            abstract_state,
            restored["state"],
        )
        return state, *(restored[name] if name in saved else None for name in _JSON_ITEMS)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
