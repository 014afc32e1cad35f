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

Damaged steps. Before a step is restored its files are checked without reading any array (``step_problems``): the
JSON files (step and item metadata, the JSON items), the OCDBT index of the ``state`` item (manifest, b-tree nodes,
and that every data file it references exists and is long enough), and that every array of ``state/_METADATA`` is
in the index. When that check fails, or the restore itself fails and reading every array back names a damaged one,
``restore()`` (latest step) logs what is wrong, file by file, and falls back to the newest intact earlier step; the
damaged step directories are then renamed ``<step>.damaged`` (kept as evidence; Orbax lists only ``<step>``, so the
step number can be saved again) and recorded in ``TrainCheckpointer.set_aside``. When no step is intact nothing is
moved and ``CheckpointError`` lists every step and what is wrong with it. A step whose files all read back intact
but that does not restore counts as damaged when an older step restores; when the next step fails that way too, the
checkpoint does not fit the requested state (another model or stage configuration): ``CheckpointError``, nothing moved.
What the check cannot see: bytes changed in place inside an array's data (Zstd and OCDBT do not checksum it) or in a
JSON value that stays valid JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from etils import epath

_JSON_ITEMS = ("data_state", "config")
_JSON_ITEM_FILE = "metadata"  # the file a JsonCheckpointHandler writes in its item directory
_ARRAY_VALUE_TYPES = ("jax.Array", "np.ndarray", "scalar")  # state/_METADATA entries stored as arrays
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: no intact step (each step and its damaged files listed), a damaged step
    asked for by number, or a step whose files read back intact but that does not restore into the given state."""


@dataclasses.dataclass(frozen=True)
class DamagedStep:
    """A step that failed its check: `problems` are "<path in the step directory>: what is wrong"; `moved_to` is
    where its directory was set aside (None while it is still in place)."""

    step: int
    problems: tuple[str, ...]
    moved_to: str | None = None

    def describe(self) -> str:
        return f"step {self.step}: {'; '.join(self.problems)}"


# ----------------------------------------------------------------------------------------------------------
# Checking a step's files
# ----------------------------------------------------------------------------------------------------------


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An error's first line without TensorStore's spec / source-location suffixes."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    for suffix in (" [tensorstore_spec=", " [source locations="):
        line = line.split(suffix)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def json_file_problem(path: epath.Path, label: str) -> str | None:
    """What is wrong with the JSON file `path` (named `label` in the message); None when it parses."""
    if not path.exists():
        return f"{label}: missing"
    data = path.read_bytes()
    if not data:
        return f"{label}: empty (0 bytes)"
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"{label}: not UTF-8 text ({len(data)} bytes; {e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"{label}: not valid JSON ({len(data)} bytes; {e.msg}: line {e.lineno} column {e.colno})"
    return None


def _read_json(path: epath.Path) -> Any:
    """The JSON in `path`, or None when it is missing or does not parse (json_file_problem says why)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _kvstore_url(directory: epath.Path) -> str:
    text = os.fspath(directory)
    return (text if "://" in text else "file://" + os.path.abspath(text)).rstrip("/") + "/"


def _parse_location(location: str) -> tuple[str, int] | None:
    """An OCDBT location ("<kind>:<base>:<file>:<offset>:<length>", as `tensorstore.ocdbt.dump` writes it) ->
    (its file relative to the database directory, the end of its byte range); None when it reads otherwise."""
    head, _, tail = location.rpartition(":")
    head, _, offset = head.rpartition(":")
    parts = head.split(":", 2)
    if len(parts) != 3 or not (offset.isdigit() and tail.isdigit()):
        return None
    return parts[1] + parts[2], int(offset) + int(tail)


def _index_file_problems(state_dir: epath.Path, base: ts.KvStore) -> list[str]:
    """Walks the OCDBT b-tree of `state_dir`: every node must decode, and every file a node or value refers to must
    exist and hold the referenced byte range."""
    manifest = ts.ocdbt.dump(base).result()
    pending = [v["root"]["location"] for v in manifest.get("versions", [])[-1:] if "location" in v.get("root", {})]
    needed: dict[str, int] = {}  # file -> end of the furthest byte range referenced in it
    sizes: dict[str, int | None] = {}  # file -> its size (None: missing)
    problems, seen = [], set()
    while pending:
        location = pending.pop()
        parsed = None if location in seen else _parse_location(location)
        seen.add(location)
        if parsed is None:
            continue
        file, end = parsed
        needed[file] = max(needed.get(file, 0), end)
        if file not in sizes:
            sizes[file] = (state_dir / file).stat().length if (state_dir / file).exists() else None
        if not location.startswith("btreenode:") or sizes[file] is None or sizes[file] < end:
            continue
        try:
            node = ts.ocdbt.dump(base, location).result()
        except ValueError as e:
            problems.append(f"state/{file}: an index node does not decode ({_first_line(e)})")
            continue
        pending += [e[k] for e in node.get("entries", []) for k in ("location", "indirect_value") if k in e]
    for file, end in sorted(needed.items()):
        if sizes[file] is None:
            problems.append(f"state/{file}: missing (the index refers to bytes up to {end} of it)")
        elif sizes[file] < end:
            problems.append(f"state/{file}: truncated ({sizes[file]} bytes; the index refers to bytes up to {end})")
    return problems


def _expected_arrays(state_dir: epath.Path) -> list[str] | None:
    """The arrays `state/_METADATA` lists ("params.w" names, as in the OCDBT keys); None when it is unreadable."""
    metadata = _read_json(state_dir / "_METADATA")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
        return None
    names = []
    for entry in metadata["tree_metadata"].values():
        value = entry.get("value_metadata", {})
        if value.get("value_type") in _ARRAY_VALUE_TYPES and not value.get("skip_deserialize", False):
            names.append(".".join(str(k["key"]) for k in entry["key_metadata"]))
    return sorted(names)


def _array_read_problems(state_dir: epath.Path, arrays: list[str]) -> list[str]:
    """Reads every array of the OCDBT database in `state_dir` back (decompressed); one problem per failing array."""
    metadata = _read_json(state_dir / "_METADATA")
    driver = "zarr3" if isinstance(metadata, dict) and metadata.get("use_zarr3") else "zarr"
    context, problems = ts.Context(), []
    for name in arrays:
        spec = {"driver": driver, "kvstore": {"driver": "ocdbt", "base": _kvstore_url(state_dir), "path": name + "/"}}
        try:
            ts.open(spec, context=context, open=True, read=True).result().read().result()
        except Exception as e:  # noqa: BLE001 - a damaged file may fail in any way; the message is what matters
            problems.append(f"state array {name!r} does not read back ({_first_line(e)})")
    return problems


def _state_problems(state_dir: epath.Path, read_arrays: bool) -> list[str]:
    """The OCDBT database of the `state` item: its index, the files the index refers to, the arrays of
    `_METADATA`; with `read_arrays` (or when something is already wrong, to name the arrays) every array is read."""
    if not (state_dir / "manifest.ocdbt").exists():
        return ["state/manifest.ocdbt: missing (the index of every array in the step)"]
    try:
        url = _kvstore_url(state_dir)
        keys = [k.decode() for k in ts.KvStore.open({"driver": "ocdbt", "base": url}).result().list().result()]
        problems = _index_file_problems(state_dir, ts.KvStore.open(url).result())
    except ValueError as e:
        return [f"state/: the array index does not read ({_first_line(e)})"]
    present = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith(("/.zarray", "/zarr.json"))})
    try:
        expected = _expected_arrays(state_dir)
    except (AttributeError, KeyError, TypeError) as e:  # valid JSON, but not what Orbax writes
        problems.append(f"state/_METADATA: not the layout Orbax writes ({type(e).__name__}: {e})")
        expected = None
    missing = sorted(set(expected or ()) - set(present))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(f"state/: {len(missing)} arrays of _METADATA are missing from the index ({shown})")
    if read_arrays or problems:
        problems += _array_read_problems(state_dir, present)
    return problems


def _missing_keys_problem(path: epath.Path, label: str, keys) -> str | None:
    """A JSON item that parses but is not an object holding `keys` (e.g. a changed byte in a key name)."""
    value = _read_json(path)
    if not isinstance(value, dict):
        return f"{label}: holds a JSON {type(value).__name__}, not an object"
    missing = [k for k in keys if k not in value]
    if missing:
        return f"{label}: lacks {', '.join(map(repr, missing))} (has {', '.join(map(repr, sorted(value)[:8]))})"
    return None


def step_problems(step_dir, required_items: Mapping[str, Sequence[str]] = MappingProxyType({}), *, read_arrays=False):
    """What is wrong with the files of one checkpoint step ("<path in the step>: what"); empty when intact.

    Without `read_arrays` no array data is read (cheap: JSON files, the OCDBT index and the sizes of the files it
    refers to); with it every array is read back too. `required_items`: JSON items that must be there, each with the
    top-level keys its object must hold.
    """
    step_dir = epath.Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir}: missing"]
    problems = []
    json_files = ["_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding"]
    array_metadatas = step_dir / "state" / "array_metadatas"
    if array_metadatas.is_dir():
        json_files += [f"state/array_metadatas/{p.name}" for p in sorted(array_metadatas.iterdir())]
    problems += [p for f in json_files if (step_dir / f).exists() and (p := json_file_problem(step_dir / f, f))]
    recorded = _read_json(step_dir / "_CHECKPOINT_METADATA")
    recorded = recorded.get("item_handlers") if isinstance(recorded, dict) else None
    expected = set(required_items) | set(recorded if isinstance(recorded, dict) else ())
    for item in _JSON_ITEMS:
        if (step_dir / item).exists() or item in expected:
            label = f"{item}/{_JSON_ITEM_FILE}"
            problem = json_file_problem(step_dir / label, label)
            if problem is None and item in required_items:
                problem = _missing_keys_problem(step_dir / label, label, required_items[item])
            problems += [problem] if problem else []
    if not (step_dir / "state").is_dir():
        return [*problems, "state/: missing"]
    return problems + _state_problems(step_dir / "state", read_arrays)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def _free_name(step_dir: epath.Path) -> epath.Path:
    """Where a damaged step directory goes: ``<step>.damaged``, else ``<step>.damaged.2``, ``.3``, ..."""
    target, n = step_dir.with_name(step_dir.name + DAMAGED_SUFFIX), 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{DAMAGED_SUFFIX}.{n}")
    return target


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
        self.set_aside: list[DamagedStep] = []  # damaged steps moved to <step>.damaged by this checkpointer

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

    def step_path(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def restore(
        self,
        abstract_state,
        step: int | None = None,
        *,
        required_items: Mapping[str, Sequence[str]] = MappingProxyType({}),
    ) -> tuple[Any, dict | None, dict | None]:
        """Restores ``(state, data_state, config)`` of ``step`` (default: the newest intact step).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (see ``abstract_like``) whose shardings say
        where the arrays go; missing JSON items come back as None unless named in ``required_items`` (item -> the
        top-level keys its object must hold; a missing item or key makes the step damaged). Without ``step``,
        damaged newer steps are logged, set aside and skipped (module docstring); an explicit ``step`` that is
        damaged raises ``CheckpointError``.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint found in {self.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available steps: {steps}")
            restored, problems, error = self._try_restore(step, abstract_state, required_items)
            if error is not None:
                raise self._does_not_fit([(step, error)]) from error
            if problems:
                raise CheckpointError(f"{self.step_path(step)} is damaged: {'; '.join(problems)}")
            return restored
        # A step that fails with intact files is damaged in a way the check cannot name when an older step restores;
        # when the next one fails that way too, the checkpoint does not fit `abstract_state`: stop, move nothing.
        damaged, unexplained = [], []
        for candidate in reversed(steps):
            restored, problems, error = self._try_restore(candidate, abstract_state, required_items)
            if error is None and not problems:
                self._set_aside(damaged, candidate)
                return restored
            if error is not None:
                unexplained.append((candidate, error))
                if len(unexplained) == 2 or len(steps) == 1:
                    raise self._does_not_fit(unexplained) from error
                problems = [f"does not restore ({_first_line(error)}) although every file parses and reads back"]
            damaged.append(DamagedStep(candidate, tuple(problems)))
        raise self._no_intact_step(damaged)

    def newest_intact_step(self, required_items: Mapping[str, Sequence[str]] = MappingProxyType({})) -> int | None:
        """The newest step whose files pass the check that reads no array (None without steps); damaged newer steps
        are set aside as in ``restore``; ``CheckpointError`` when there are steps but none is intact."""
        self.wait_until_finished()
        damaged = []
        for candidate in reversed(self.all_steps()):
            problems = self._agreed(candidate, step_problems(self.step_path(candidate), required_items))
            if not problems:
                self._set_aside(damaged, candidate)
                return candidate
            damaged.append(DamagedStep(candidate, tuple(problems)))
        if damaged:
            raise self._no_intact_step(damaged)
        return None

    def _try_restore(self, step: int, abstract_state, required_items) -> tuple[Any, list[str], Exception | None]:
        """(restored, [], None); (None, what is wrong with the step's files, None); or (None, [], the restore's
        error) when the restore fails although every file reads back intact."""
        path = self.step_path(step)
        problems = self._agreed(step, step_problems(path, required_items))
        if problems:
            return None, problems, None
        try:
            return self._restore_step(step, abstract_state), [], None
        except Exception as error:  # noqa: BLE001 - classified by reading every file back
            problems = self._agreed(step, step_problems(path, required_items, read_arrays=True))
            return None, problems, None if problems else error

    def _does_not_fit(self, failures: list[tuple[int, Exception]]) -> CheckpointError:
        step, error = failures[0]
        lines = " ".join(str(error).strip().splitlines()[:3])
        also = f", and neither does step {failures[1][0]}" if len(failures) > 1 else ""
        return CheckpointError(
            f"{self.step_path(step)} does not restore ({type(error).__name__}: {lines}), yet every file of it reads "
            f"back intact{also}, so nothing is treated as damaged and nothing was moved: was it written by another "
            "model or stage configuration?"
        )

    def _agreed(self, step: int, problems: list[str]) -> list[str]:
        """Every process takes the same decision: a step damaged for one process is damaged for all."""
        if _any_process(bool(problems)) and not problems:
            return [f"step {step} reads back damaged on another process"]
        return problems

    def _restore_step(self, step: int, abstract_state) -> tuple[Any, dict | None, dict | None]:
        saved = {name for name in _JSON_ITEMS if (self.step_path(step) / name).exists()}  # JSON items written
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

    def _set_aside(self, damaged: list[DamagedStep], intact: int) -> None:
        """Renames each damaged step directory to ``<step>.damaged`` (``.damaged.2``, ... if taken; every process
        names the targets before process 0 renames, then waits for it), logs it and records it in ``set_aside``."""
        if not damaged:
            return
        targets = [_free_name(self.step_path(record.step)) for record in damaged]
        _sync_processes(f"jaxvlm-set-aside-named-{self.directory}-{intact}")
        for record, target in zip(damaged, targets):
            source = self.step_path(record.step)
            if jax.process_index() == 0:
                source.rename(target)
            self.set_aside.append(dataclasses.replace(record, moved_to=os.fspath(target)))
            problems = "; ".join(record.problems)
            logging.warning(
                "checkpoint %s is damaged, using step %d instead; moved to %s. %s", source, intact, target, problems
            )
        _sync_processes(f"jaxvlm-set-aside-moved-{self.directory}-{intact}")
        self._manager.reload()

    def _no_intact_step(self, damaged: list[DamagedStep]) -> CheckpointError:
        paths = " ".join(os.fspath(self.step_path(d.step)) for d in damaged)
        return CheckpointError(
            f"no intact checkpoint in {self.directory}; every step is damaged:\n"
            + "\n".join(f"  {d.describe()}" for d in damaged)
            + "\nNothing was moved. Restore these steps from a copy, or delete them to start over without them "
            f"(the run then trains this stage from its first step): rm -r {paths}"
        )

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
