"""Training metrics on the host: a JSONL + TensorBoard writer, their readers, a step timer and a progress bar.

Nothing here touches jax: values are read with ``np.asarray``, which also fetches a 0-d jax array.

Files written under a workdir by :class:`MetricsWriter` (only on the process that has ``enabled=True``,
in practice JAX process 0):

* ``<workdir>/metrics.jsonl``: one JSON object per line and per :meth:`MetricsWriter.write` call::

      {"step": 12, "time": 1767000000.5, "train/accuracy": 0.5, "train/loss": 0.25, "train/stage": "grpo"}

  ``step`` is the global training step, ``time`` the Unix time of the write, then the metrics with their
  prefix, keys sorted. Integer values stay JSON integers, other numbers are JSON floats; non-finite numbers
  (NaN, +-inf) and ``None`` are written as ``null`` so every line is strict JSON; strings are kept as
  strings. A resumed run appends to the same file. Each line is flushed when written, so a killed process
  leaves complete lines plus at most one partial last line; a new writer drops that partial line before
  appending, and :func:`read_metrics` skips it.
* ``<workdir>/tensorboard/events.out.tfevents.<unix time>.<host>.<pid>.<random>``: TensorBoard event files
  written with ``tensorboardX.SummaryWriter`` (one file per writer, so a resumed run adds a file next to the
  old ones). Every numeric value is a scalar summary whose tag is the prefixed key (``"train/loss"``), with
  ``step`` as its step; non-finite values are written as they are (TensorBoard shows NaN / inf), strings and
  ``None`` are not written. tensorboardX stores scalars as ``Summary.Value.simple_value`` (float32).
  Characters TensorBoard does not allow in tags (anything but letters, digits, ``_ - / .``) are replaced with
  ``_`` by tensorboardX.

An event file is a sequence of TFRecords: ``uint64 length`` (little-endian), ``uint32 masked CRC-32C of
the length bytes``, ``length`` bytes of a serialized ``Event`` protocol buffer, ``uint32 masked CRC-32C of
the data``. :func:`read_tensorboard_scalars` reads them back without TensorFlow or TensorBoard.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVENT_FILE_GLOB = "events.out.tfevents.*"
_RESERVED_KEYS = ("step", "time")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _host_value(key: str, value: Any) -> int | float | str | None:
    """A metric value as a Python int, float, str or None (see the module docstring for what each becomes)."""
    if value is None or isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"metric {key!r}: expected a scalar, got an array of shape {array.shape}")
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return int(array)
    try:
        return float(array)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r}: {type(value).__name__} value {value!r} is not a number or a string") from e


def _json_value(value: int | float | str | None) -> int | float | str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop_partial_last_line(path: str) -> None:
    """Truncate `path` after its last newline: removes the partial line a killed writer may have left."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end, chunk = size, 4096
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        logger.warning(
            "%s: dropping a partial last line of %d bytes (left by an interrupted writer)", path, size - keep
        )
        f.truncate(keep)


class MetricsWriter:
    """Appends metrics to ``<workdir>/metrics.jsonl`` and to TensorBoard event files in ``<workdir>/tensorboard/``.

    Args:
      workdir: the run directory (created if missing).
      enabled: False on every process but one (``jax.process_index() != 0``): then nothing is written and no
        file or directory is created, but every method still works.
      tensorboard: also write TensorBoard event files (needs the ``tensorboardX`` package; pass False to
        write only the JSONL file).
      tensorboard_flush_secs: how often tensorboardX's background thread flushes the event file.
      wall_clock: the Unix-time source of the records' ``time`` and of the events' wall time (tests fake it).

    Use as a context manager or call :meth:`close` at the end. The JSONL file is flushed after every
    :meth:`write`; TensorBoard events are written by tensorboardX's background thread and are all on disk
    after :meth:`close` (and within ``tensorboard_flush_secs`` before that).
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        tensorboard_flush_secs: int = 30,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.workdir = workdir
        self.enabled = enabled
        self._wall_clock = wall_clock
        self.jsonl_path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR) if tensorboard else None
        self._jsonl: TextIO | None = None
        self._summary_writer = None
        self._closed = False
        summary_writer_cls = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter as summary_writer_cls
            except ImportError as e:
                raise ImportError(
                    "MetricsWriter(tensorboard=True) needs the 'tensorboardX' package (pip install tensorboardX); "
                    "install it or pass tensorboard=False to write only metrics.jsonl"
                ) from e
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.jsonl_path):
            _drop_partial_last_line(self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8", buffering=1)  # line-buffered
        if summary_writer_cls is not None:
            # One event file per writer: tensorboardX opens its file with mode "wb" and names it by the second
            # and host only, so two writers started in the same second would overwrite each other.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._summary_writer = summary_writer_cls(
                self.tensorboard_dir, flush_secs=tensorboard_flush_secs, filename_suffix=suffix
            )

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        """Record `metrics` at global step `step`, each key prefixed with `prefix` (e.g. ``"train/"``).

        Values: Python / numpy numbers, 0-d numpy or jax arrays, strings (JSONL only) and None (JSONL null
        only). Raises ValueError for a non-scalar array or a key that becomes "step" or "time", TypeError for
        any other value, and RuntimeError after :meth:`close`. A disabled writer checks only the keys.
        """
        if self._closed:
            raise RuntimeError("MetricsWriter.write after close()")
        names = {prefix + key: key for key in metrics}
        reserved = sorted(set(names) & set(_RESERVED_KEYS))
        if reserved:
            raise ValueError(f"metric names {reserved} are reserved for the record's own fields")
        if not self.enabled:
            return  # without reading the values: no device-to-host copy on the processes that do not write
        values = {name: _host_value(name, metrics[names[name]]) for name in sorted(names)}
        step = int(step)
        now = float(self._wall_clock())
        record = {"step": step, "time": now, **{k: _json_value(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self._summary_writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._summary_writer.add_scalar(name, float(value), step, walltime=now)

    def flush(self) -> None:
        """Flush the JSONL file and what tensorboardX's background thread has written so far."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._summary_writer is not None:
            self._summary_writer.flush()

    def close(self) -> None:
        """Write everything out and close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def read_metrics(path_or_workdir: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (give the file or the workdir holding it), in file order.

    A last line without its newline that is not valid JSON is the partial write of a killed process and is
    skipped. Any other line that is not a JSON object raises ValueError naming ``file:line``. ``null``
    values (non-finite numbers) come back as None.
    """
    path = path_or_workdir
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # After split, a file ending with "\n" has an empty last element; otherwise the last element is unterminated.
    unterminated = lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        records.append(_parse_record(path, number, line))
    if unterminated.strip():
        try:
            records.append(_parse_record(path, len(lines) + 1, unterminated))
        except ValueError:
            logger.warning("%s:%d: skipping a truncated last line", path, len(lines) + 1)
    return records


def _parse_record(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: corrupt metrics line ({e.msg}): {line[:80]!r}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def _tensor_scalar(tensor) -> float | None:
    """The value of a one-element numeric TensorProto (the "new style" scalar summary), else None."""
    from tensorboardX.proto import types_pb2

    if any(dim.size != 1 for dim in tensor.tensor_shape.dim):  # one stored value may fill a larger shape
        return None
    for field in ("float_val", "double_val", "int_val", "int64_val", "bool_val"):
        values = getattr(tensor, field)
        if len(values) == 1:
            return float(values[0])
        if len(values) > 1:
            return None
    if tensor.half_val:  # DT_HALF / DT_BFLOAT16: 16-bit patterns stored in int32s
        if len(tensor.half_val) != 1 or tensor.dtype != types_pb2.DT_HALF:
            return None
        return float(np.array([tensor.half_val[0]], np.uint16).view(np.float16)[0])
    dtypes = {
        types_pb2.DT_FLOAT: "<f4",
        types_pb2.DT_DOUBLE: "<f8",
        types_pb2.DT_INT32: "<i4",
        types_pb2.DT_INT64: "<i8",
        types_pb2.DT_HALF: "<f2",
    }
    if tensor.tensor_content and tensor.dtype in dtypes:
        values = np.frombuffer(tensor.tensor_content, dtypes[tensor.dtype])
        if values.size == 1:
            return float(values[0])
    return None


def _event_records(path: str) -> Iterator[bytes]:
    """The data of each TFRecord in `path`; a truncated last record (a writer still running or killed) ends it."""
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset < len(data):
        if len(data) - offset < 12:
            logger.warning("%s: truncated record header at byte %d", path, offset)
            return
        header = data[offset : offset + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            raise ValueError(f"{path}: corrupt record at byte {offset}: the length's checksum does not match")
        end = offset + 12 + length + 4
        if end > len(data):
            logger.warning(
                "%s: truncated record at byte %d (%d bytes of %d)", path, offset, len(data) - offset, end - offset
            )
            return
        yield data[offset + 12 : offset + 12 + length]
        offset = end


def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logdir` (searched recursively): ``{tag: [(step, value)]}``.

    Reads ``Summary.Value.simple_value`` (what tensorboardX and ``tf.summary.scalar`` v1 write) and one-element
    numeric tensors (TF2-style scalars). Points are sorted by step; points of the same step keep their order
    (files by name, i.e. by creation time, then file order), so a step written again after a resume appears
    twice. Needs ``tensorboardX`` for the ``Event`` protocol buffer.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    paths = sorted(glob.glob(os.path.join(glob.escape(logdir), "**", EVENT_FILE_GLOB), recursive=True))
    for path in paths:
        for number, data in enumerate(_event_records(path)):
            event = event_pb2.Event()
            try:
                event.ParseFromString(data)
            except Exception as e:  # protobuf's DecodeError
                raise ValueError(f"{path}: record {number} is not an Event protocol buffer: {e}") from e
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number_value = float(value.simple_value)
                elif kind == "tensor":
                    number_value = _tensor_scalar(value.tensor)
                    if number_value is None:
                        continue
                else:
                    continue
                scalars.setdefault(value.tag, []).append((int(event.step), number_value))
    for points in scalars.values():
        points.sort(key=lambda point: point[0])
    return scalars


# ----------------------------------------------------------------------------------------------------------
# Timing and progress
# ----------------------------------------------------------------------------------------------------------


class StepTimer:
    """Wall time per training step, split into the first step (which includes XLA compilation) and the rest.

    ``timer.start(); ...; seconds = timer.stop()`` or ``with timer.step(): ...``. Call :meth:`reset` when
    shapes change (a new stage compiles again). `clock` is any monotonic seconds counter (tests pass a fake).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget every step: the next one counts as a first (compiling) step again."""
        self._started_at: float | None = None
        self._first: float | None = None
        self._steady_total = 0.0
        self._steady_count = 0

    def start(self) -> None:
        """Start timing a step (restarts the current one if it was not stopped)."""
        self._started_at = self._clock()

    def stop(self) -> float:
        """End the step started by :meth:`start`; returns its duration in seconds."""
        if self._started_at is None:
            raise RuntimeError("StepTimer.stop() without start()")
        seconds = self._clock() - self._started_at
        self._started_at = None
        if self._first is None:
            self._first = seconds
        else:
            self._steady_total += seconds
            self._steady_count += 1
        return seconds

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time the body of a ``with`` block as one step."""
        self.start()
        yield
        self.stop()

    @property
    def num_steps(self) -> int:
        """Steps timed since construction or the last :meth:`reset`."""
        return self._steady_count + (self._first is not None)

    @property
    def first_step_s(self) -> float | None:
        """Duration of the first step (compilation + one step); None before it ends."""
        return self._first

    @property
    def steady_step_s(self) -> float | None:
        """Mean duration of the steps after the first; None until two steps have been timed."""
        return self._steady_total / self._steady_count if self._steady_count else None

    @property
    def steps_per_s(self) -> float | None:
        """1 / :attr:`steady_step_s`; None while that is unknown (or zero)."""
        steady = self.steady_step_s
        return 1.0 / steady if steady else None

    @property
    def compile_estimate_s(self) -> float | None:
        """How much longer the first step took than a steady one (≈ compile time), at least 0; None until known."""
        steady = self.steady_step_s
        return None if steady is None else max(self._first - steady, 0.0)

    def summary(self) -> dict[str, float | int | None]:
        """``{"steps", "first_step_s", "steady_step_s", "steps_per_s", "compile_estimate_s"}`` (None where unknown)."""
        return {
            "steps": self.num_steps,
            "first_step_s": self.first_step_s,
            "steady_step_s": self.steady_step_s,
            "steps_per_s": self.steps_per_s,
            "compile_estimate_s": self.compile_estimate_s,
        }


def format_duration(seconds: float) -> str:
    """``"H:MM:SS"`` of a non-negative number of seconds, rounded to the second (hours are not capped at 24)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"format_duration needs a finite non-negative number of seconds, got {seconds}")
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_metric(value: Any) -> str:
    """A metric for display: 3 decimals for ordinary magnitudes, 4 significant digits below 1e-3 or from 1e5."""
    if isinstance(value, str):
        return value
    value = float(np.asarray(value))
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.3f}"
    return f"{value:.4g}"


def _format_rate(steps_per_s: float) -> str:
    return f"{steps_per_s:.0f}" if steps_per_s >= 1000 else f"{steps_per_s:.3g}"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """A one-line training progress display::

        [grpo] grpo 40/100 [40%] 2.5 step/s reward 1.234 accuracy 0.500 loss 0.123 ETA 0:00:24

    On a terminal the line is rewritten in place (``"\\r"``); on anything else (a log file) a full line is
    printed at the first update, then at most once every `min_interval_s` seconds, and at the last step, so
    logs stay readable. The rate and ETA leave out the first update's step (it includes XLA compilation):
    rate = steps since the first update / time since the first update; until a second update the line says
    ``compiling…`` instead. Only the metrics named in `keys` that are present in an update are shown, in
    `keys` order. A resumed stage may start at any step: the first :meth:`update` sets the reference.

    Args:
      total: the step count at which the stage ends.
      desc: text in front of the counter.
      enabled: False prints nothing (every method still works).
      stream: where to write (stderr by default).
      clock: monotonic seconds counter (tests pass a fake).
      keys: metric names to show.
      min_interval_s: least time between two printed lines when `stream` is not a terminal.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
        keys: tuple[str, ...] = ("reward", "accuracy", "loss"),
        min_interval_s: float = 10.0,
    ):
        self.total = int(total)
        self.desc = desc
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.keys = tuple(keys)
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._tty = _is_tty(self.stream)
        self._reference: tuple[int, float] | None = None  # (step, time) of the first update
        self._last_printed_at: float | None = None
        self._pending_line: str | None = None  # non-TTY: the latest line, if not printed yet
        self._line_open = False  # TTY: a line is on screen without its newline
        self._width = 0
        self._closed = False

    def render(self, step: int, metrics: Mapping[str, Any], now: float) -> str:
        """The text of the line for `step` at clock time `now` (no side effects)."""
        parts = [self.desc] if self.desc else []
        percent = 100 if self.total <= 0 else min(100, 100 * step // self.total)
        parts.append(f"{step}/{self.total} [{percent}%]")
        rate = None
        if self._reference is not None:
            first_step, first_time = self._reference
            if now > first_time and step > first_step:
                rate = (step - first_step) / (now - first_time)
        parts.append("compiling…" if rate is None else f"{_format_rate(rate)} step/s")
        parts.extend(f"{key} {format_metric(metrics[key])}" for key in self.keys if key in metrics)
        if rate is not None:
            parts.append(f"ETA {format_duration(max(self.total - step, 0) / rate)}")
        return " ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Show the progress after `step` steps (out of `total`) with the latest `metrics`."""
        if not self.enabled or self._closed:
            return
        now = self._clock()
        line = self.render(step, metrics or {}, now)
        if self._reference is None:
            self._reference = (step, now)
        if self._tty:
            padding = " " * max(self._width - len(line), 0)  # blank out the rest of a longer previous line
            self.stream.write("\r" + line + padding)
            self.stream.flush()
            self._width, self._line_open = len(line), True
            return
        due = self._last_printed_at is None or now - self._last_printed_at >= self.min_interval_s or step >= self.total
        if due:
            self._print_line(line, now)
        else:
            self._pending_line = line

    def _print_line(self, line: str, now: float) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_printed_at, self._pending_line = now, None

    def close(self) -> None:
        """End the display: a terminal line gets its newline; on a log, an unprinted last update is printed."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
        elif self._pending_line is not None:
            self._print_line(self._pending_line, self._clock())

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
