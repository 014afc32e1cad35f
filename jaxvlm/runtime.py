"""What a run sets up from its config before any stage: tokenizer, model (one builder for the trainer, evaluation,
the benchmarks and the forward check), image processor, mesh, metrics writer; and the run's plumbing (stop signals,
the workdir lock, progress file)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import math
import os
import re
import signal
import socket
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxvlm import models, reproducibility, sharding
from jaxvlm.configuration import ConfigError, ModelSpec, RunSpec
from jaxvlm.metrics import MetricsWriter
from jaxvlm.models import builder, lora
from jaxvlm.processing.image import ImageProcessor, image_processor_for_model

PROGRESS_FILE = "progress.json"
LOCK_FILE = "train.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used as it is: another trainer holds it, or its progress file is damaged."""


def model_config(spec: ModelSpec, tokenizer=None) -> models.ModelConfig:
    """The ModelConfig of `config.model`: the checkpoint's config.json, or the preset (its token ids taken from
    `tokenizer` when given, e.g. the built-in gym tokenizer), with the model options on top."""
    if spec.path:
        return models.load_hf_config(spec.path, **spec.overrides)
    cfg = models.preset(spec.preset, **spec.overrides)
    if tokenizer is not None:
        from jaxvlm.tokenizer import configure_model_for_tokenizer

        cfg = configure_model_for_tokenizer(cfg, tokenizer)
    return cfg


def build_model(spec: ModelSpec, seed: int, tokenizer=None, *, abstract: bool = False) -> tuple[models.Qwen25VL, Any]:
    """The model and params of `config.model`: a checkpoint's weights, or a preset's random weights (`seed`);
    `abstract=True`: shapes and dtypes only (nothing is read or allocated)."""
    if abstract:
        cfg = model_config(spec, tokenizer)
        return models.build_model(cfg), models.abstract_params(cfg)
    if spec.path:
        model, params = models.load_pretrained(spec.path, **spec.overrides)  # the base weights
        if model.config.lora is not None:
            key = jax.random.fold_in(jax.random.key(seed), builder.ADAPTER_SEED)
            params = lora.add_adapters(params, model.config.lora, key)
    else:
        cfg = model_config(spec, tokenizer)
        model, params = models.build_model(cfg), models.init_params(cfg, seed)  # adapters included
    if spec.lora_path:
        try:
            params = lora.load_peft_adapter(spec.lora_path, model.config, params)
        except lora.LoraError as error:
            raise ConfigError(f"config.model.lora.path: {error}") from None
    return model, params


def check_lora(spec: RunSpec) -> None:
    """`config.model.lora.targets` select linear layers that can carry adapters, and a `lora.path` adapter fits them:
    checked on abstract shapes (nothing loaded), ConfigError naming the key."""
    settings = spec.model.overrides.get("lora")
    if settings is None:
        return
    cfg = model_config(spec.model)
    base = models.abstract_params(cfg.replace(lora=None))
    try:
        lora.targeted_layers(base, settings)
    except lora.LoraError as error:
        raise ConfigError(f"config.model.lora.targets: {error}") from None


def check_frozen_patterns(spec: RunSpec) -> None:
    """Each training stage's `optimizer.frozen` patterns match some parameter of the model: checked on its abstract
    shapes (config.json or the preset; nothing loaded), so a pattern for another model fails at start-up."""
    stages = [s for s in spec.stages if s.optimizer is not None and s.optimizer.frozen]
    if not stages:
        return
    abstract = models.abstract_params(model_config(spec.model))
    names = [sharding.path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    for s in stages:
        for pattern in s.optimizer.frozen:
            if not any(re.search(pattern, name) for name in names):
                raise ConfigError(
                    f"config.{s.key}.optimizer.frozen: {pattern!r} matches no parameter of this model "
                    f"(its parameters are named like {names[0]!r}, {names[-1]!r})"
                )


def build_tokenizer(spec: ModelSpec, workdir: str):
    """`config.model.tokenizer`, else the checkpoint's, else the built-in gym tokenizer (written into workdir)."""
    from transformers import AutoTokenizer

    from jaxvlm.tokenizer import builtin_tokenizer

    if spec.tokenizer:
        return AutoTokenizer.from_pretrained(spec.tokenizer)
    if spec.path:
        return AutoTokenizer.from_pretrained(spec.path)
    suffix = f"-{jax.process_index()}" if jax.process_count() > 1 else ""  # no two writers on one directory
    return builtin_tokenizer(os.path.join(workdir, "tokenizer" + suffix))


def build_image_processor(spec: ModelSpec, model_config: models.ModelConfig) -> ImageProcessor | None:
    """The checkpoint's image processor (or the family's default for the model's vision tower, see
    `image_processor_for_model`) with the config's pixel bounds; None for a text-only model."""
    if model_config.vision is None:
        return None
    if spec.path and os.path.isfile(os.path.join(spec.path, "preprocessor_config.json")):
        return dataclasses.replace(
            ImageProcessor.from_pretrained(spec.path), min_pixels=spec.min_pixels, max_pixels=spec.max_pixels
        )
    return image_processor_for_model(model_config, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)


def build_mesh(shape) -> jax.sharding.Mesh:
    """The ("data", "fsdp", "tensor") mesh of `config.mesh.shape` (a shape without -1 may use the first devices
    only, e.g. (1, 1, 1) on a multi-device host)."""
    shape = tuple(int(d) for d in shape)
    devices = jax.devices()
    if -1 not in shape and math.prod(shape) < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(
                f"config.mesh.shape: {shape} uses {math.prod(shape)} of the {len(devices)} devices of a "
                f"{jax.process_count()}-process run; every process needs devices in the mesh (e.g. (1, -1, 1))"
            )
        devices = devices[: math.prod(shape)]
    return sharding.make_mesh(shape, devices)


@dataclasses.dataclass
class Runtime:
    """What every stage shares."""

    spec: RunSpec
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
    def seed(self) -> int:
        return self.spec.seed

    @property
    def model_source(self) -> str:
        return self.spec.model.path or f"preset:{self.spec.model.preset}"

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def setup(spec: RunSpec, workdir: str) -> Runtime:
    """Tokenizer, model (checkpoint or preset with random weights), image processor, mesh, metrics writer."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        reproducibility.record_environment(workdir)  # what the run's numbers depend on besides its config
    tokenizer = build_tokenizer(spec.model, workdir)
    model, params = build_model(spec.model, spec.seed, None if spec.model.path else tokenizer)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=spec.train.tensorboard)
    return Runtime(
        spec,
        workdir,
        model,
        tokenizer,
        build_image_processor(spec.model, model.config),
        build_mesh(spec.mesh_shape),
        writer,
        params,
    )


# ----------------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------------


def any_process(flag: bool) -> bool:
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
        return any_process(self.received is not None)


# ----------------------------------------------------------------------------------------------------------
# One trainer per workdir
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What `<workdir>/train.lock` says about the trainer holding it."""

    pid: int
    host: str
    since: str  # ISO 8601 local time with its UTC offset

    def describe(self) -> str:
        return f"pid {self.pid}@{self.host} since {self.since}"

    @classmethod
    def current(cls) -> LockHolder:
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), now)


def _read_holder(fd: int) -> LockHolder | None:
    """The holder written in the open lock file `fd`; None when it is empty or unreadable (being written)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return LockHolder(int(record["pid"]), str(record["host"]), str(record["since"]))
    except (ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class WorkdirLock:
    """`<workdir>/train.lock`: at most one trainer per workdir.

    Liveness comes from `fcntl.flock` on the file (the kernel drops it when the holder exits, however it exits); the
    file's JSON ({"pid", "host", "since"}) names the holder in the error a second trainer gets. A lock file nobody
    holds is stale (its trainer was killed): on the same host it is taken over with a warning; written by another
    host, where liveness cannot be checked from here (flock may not reach across hosts), it is refused with how to
    remove it. On a filesystem without flock, liveness is whether the recorded pid runs (same host only).
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd, holder, held = self._open_and_lock()
        me = LockHolder.current()
        if held:
            os.close(fd)
            who = holder.describe() if holder else "a trainer that is still writing its lock file"
            raise WorkdirError(f"workdir {self.workdir} is in use by another trainer: {who} (lock file {self.path})")
        if holder is not None and holder.host != me.host:
            os.close(fd)
            raise WorkdirError(
                f"workdir {self.workdir} was locked by {holder.describe()}, on another host: whether that trainer "
                f"still runs cannot be checked from {me.host}. If no trainer runs on this workdir, delete {self.path} "
                "and re-run"
            )
        if holder is not None:
            logging.warning(
                "%s: taking over the stale lock of %s (that trainer no longer runs)", self.path, holder.describe()
            )
        elif os.fstat(fd).st_size > 0:
            logging.warning("%s: taking over a stale lock file whose content does not say who held it", self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dataclasses.asdict(me)).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _open_and_lock(self) -> tuple[int, LockHolder | None, bool]:
        """(open fd of the lock file, its recorded holder, whether a live trainer holds it)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return fd, holder, True
                # No flock on this filesystem: the recorded pid says whether the holder runs (same host only).
                alive = holder is not None and holder.host == socket.gethostname() and _pid_alive(holder.pid)
                return fd, holder, alive
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else its holder removed it between our open and flock: lock the new one
                return fd, _read_holder(fd), False
            os.close(fd)

    def release(self) -> None:
        """Removes the lock file (while still holding it, so no one locks a file about to vanish) and unlocks."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[WorkdirLock]:
    """Holds `<workdir>/train.lock` for the block. In a multi-process run process 0 takes it for all (they share
    the workdir) and every process raises when it could not. Released on exit, exceptions and signals included."""
    os.makedirs(workdir, exist_ok=True)
    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirError as e:
            error = e
    if any_process(error is not None):
        raise error or WorkdirError(f"workdir {workdir}: process 0 could not lock it (its error says why)")
    try:
        yield lock
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------
# Progress file
# ----------------------------------------------------------------------------------------------------------


def progress_problem(data: bytes) -> str | None:
    """What is wrong with the bytes of a progress file; None when they hold {"completed": {stage: steps}}."""
    try:
        progress = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({len(data)} bytes; {e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({len(data)} bytes; {e.msg}: line {e.lineno} column {e.colno})"
    if not isinstance(progress, dict):
        return f"holds a JSON {type(progress).__name__}, not an object"
    if not isinstance(progress.get("completed"), dict):
        got = type(progress["completed"]).__name__ if "completed" in progress else "nothing"
        return f'"completed" must be an object of stage: steps; got {got}'
    for stage, steps in progress["completed"].items():
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            return f'"completed"."{stage}" must be a step count (an integer >= 0); got {steps!r}'
    return None


def load_progress(workdir: str) -> dict:
    """{"completed": {stage: steps}} of a run in `workdir` (empty for a new run); WorkdirError naming the file when it
    is damaged."""
    path = os.path.join(workdir, PROGRESS_FILE)
    if not os.path.isfile(path):
        return {"completed": {}}
    with open(path, "rb") as f:
        data = f.read()
    problem = progress_problem(data)
    if problem is not None:
        raise WorkdirError(
            f'{path}: {problem}. It records the training stages that are done, as {{"completed": {{"<stage>": '
            "<steps>}}. Delete it and re-run the same command: every stage is resumed from its own checkpoints "
            f"({os.path.join(workdir, 'checkpoints')}/<stage>), so a finished stage is restored, not trained again"
        )
    return json.loads(data)


def save_progress(rt: Runtime, progress: dict) -> None:
    if rt.is_main:
        tmp = os.path.join(rt.workdir, PROGRESS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(progress, f, indent=2)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new, never a torn one
        os.replace(tmp, os.path.join(rt.workdir, PROGRESS_FILE))
