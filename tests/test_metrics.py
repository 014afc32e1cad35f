"""jaxvlm.metrics: JSONL + TensorBoard writing and reading, StepTimer and ProgressBar on fake clocks."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.metrics import (
    MetricsWriter,
    ProgressBar,
    StepTimer,
    format_duration,
    format_metric,
    read_metrics,
    read_tensorboard_scalars,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _event_files(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "tensorboard")))


# ----------------------------------------------------------------------------------------------------------
# MetricsWriter + readers
# ----------------------------------------------------------------------------------------------------------


def test_written_metrics_read_back_from_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path / "run")
    clock = FakeClock(1_700_000_000.25)
    with MetricsWriter(workdir, wall_clock=clock) as writer:
        writer.write(
            1,
            {
                "loss": 0.5,
                "count": 3,
                "acc": np.float32(0.25),
                "grad": np.array(1.5),
                "kl": jnp.asarray(0.125, jnp.bfloat16),
                "bad": float("nan"),
                "stage": "sft",
            },
            prefix="train/",
        )
        clock.now += 2.0
        writer.write(2, {"accuracy": np.float64(0.75), "accuracy/count": np.int64(4), "missing": None}, prefix="eval/")
        writer.write(3, {"loss": -math.inf, "stage": "grpo"}, prefix="train/")

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert len(lines) == 3
    for line in lines:  # strict JSON: no NaN / Infinity tokens
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))

    records = read_metrics(workdir)
    assert records == [
        {
            "step": 1,
            "time": 1_700_000_000.25,
            "train/acc": 0.25,
            "train/bad": None,
            "train/count": 3,
            "train/grad": 1.5,
            "train/kl": 0.125,
            "train/loss": 0.5,
            "train/stage": "sft",
        },
        {"step": 2, "time": 1_700_000_002.25, "eval/accuracy": 0.75, "eval/accuracy/count": 4, "eval/missing": None},
        {"step": 3, "time": 1_700_000_002.25, "train/loss": None, "train/stage": "grpo"},
    ]
    assert list(records[0]) == [
        "step",
        "time",
        "train/acc",
        "train/bad",
        "train/count",
        "train/grad",
        "train/kl",
        "train/loss",
        "train/stage",
    ]  # step, time, then sorted keys
    assert isinstance(records[0]["train/count"], int) and isinstance(records[1]["eval/accuracy/count"], int)
    assert read_metrics(os.path.join(workdir, "metrics.jsonl")) == records  # the file path works too

    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert set(scalars) == {
        "train/acc",
        "train/bad",
        "train/count",
        "train/grad",
        "train/kl",
        "train/loss",
        "eval/accuracy",
        "eval/accuracy/count",
    }  # no strings, no None
    assert scalars["train/loss"] == [(1, 0.5), (3, -math.inf)]
    assert scalars["train/count"] == [(1, 3.0)]
    assert scalars["train/acc"] == [(1, 0.25)] and scalars["train/grad"] == [(1, 1.5)]
    assert scalars["train/kl"] == [(1, 0.125)]
    assert scalars["eval/accuracy"] == [(2, 0.75)] and scalars["eval/accuracy/count"] == [(2, 4.0)]
    [(step, value)] = scalars["train/bad"]
    assert step == 1 and math.isnan(value)


def test_a_second_writer_appends_to_the_same_run(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir) as writer:
        writer.write(1, {"loss": 1.0}, prefix="train/")
        writer.write(2, {"loss": 0.5}, prefix="train/")
    with MetricsWriter(workdir) as writer:  # a resumed run, usually within the same second in tests
        writer.write(3, {"loss": 0.25}, prefix="train/")
    assert [(r["step"], r["train/loss"]) for r in read_metrics(workdir)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert len(_event_files(workdir)) == 2  # one event file per writer: neither overwrites the other
    assert read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))["train/loss"] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.25),
    ]


def test_truncated_last_line_is_skipped_and_dropped_on_resume(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, tensorboard=False) as writer:
        writer.write(1, {"loss": 1.0})
        writer.write(2, {"loss": 0.5})
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 17000')  # what a killed writer leaves
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with open(str(tmp_path / "other.jsonl"), "w") as f:
        f.write('{"step": 1}\n{"step": 2}')  # a complete last line without its newline is kept
    assert read_metrics(str(tmp_path / "other.jsonl")) == [{"step": 1}, {"step": 2}]

    with MetricsWriter(workdir, tensorboard=False) as writer:
        writer.write(3, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    with open(path) as f:
        assert all(json.loads(line)["step"] for line in f.read().splitlines())  # no line was glued to the partial one


def test_corrupt_line_in_the_middle_raises_with_file_and_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: corrupt"):
        read_metrics(str(tmp_path))
    with open(path, "w") as f:  # a complete (newline-terminated) last line is not a truncation: it must parse
        f.write('{"step": 1, "loss": 1.0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        read_metrics(path)


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(str(workdir), enabled=False) as writer:
        writer.write(1, {"loss": 0.5, "stage": "sft"}, prefix="train/")
        writer.flush()
    writer.close()  # closing twice is fine
    assert not workdir.exists()


def test_writer_rejects_bad_metrics(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(ValueError, match="shape \\(2,\\)"):
            writer.write(1, {"loss": np.array([1.0, 2.0])})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"time": 1.0})
        with pytest.raises(TypeError, match="'bad'"):
            writer.write(1, {"bad": object()})
    with pytest.raises(RuntimeError, match="after close"):
        writer.write(2, {"loss": 1.0})
    assert read_metrics(str(tmp_path)) == []  # a failed write writes no partial record


def test_missing_tensorboardx_is_reported_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes `import tensorboardX` raise ImportError
    with pytest.raises(ImportError, match="tensorboardX.*tensorboard=False"):
        MetricsWriter(str(tmp_path / "a"))
    with MetricsWriter(str(tmp_path / "b"), tensorboard=False) as writer:
        writer.write(1, {"loss": 0.5})
    assert os.listdir(tmp_path / "b") == ["metrics.jsonl"]


def _write_record(f, data: bytes) -> None:
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    f.write(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))


def test_tensorboard_reader_handles_tensor_scalars_and_truncated_files(tmp_path):
    from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    def event(step, **value):
        return event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(**value)]))

    vector_shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
    events = [
        event_pb2.Event(file_version="brain.Event:2"),
        event(5, tag="tf2/loss", tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[2.5])),
        event(
            4,
            tag="tf2/loss",
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_content=np.array(3.25, "<f8").tobytes()),
        ),
        event(
            4,
            tag="vector",
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0], tensor_shape=vector_shape),
        ),
        event(4, tag="text", tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"hi"])),
        event(6, tag="v1/loss", simple_value=0.5),
    ]
    logdir = tmp_path / "tb" / "nested"
    logdir.mkdir(parents=True)
    path = logdir / "events.out.tfevents.1.host"
    with open(path, "wb") as f:
        for e in events:
            _write_record(f, e.SerializeToString())
        complete = f.tell()
        _write_record(f, event(7, tag="v1/loss", simple_value=9.0).SerializeToString())
    with open(path, "rb+") as f:
        f.truncate(complete + 20)  # the last record was cut off by a killed writer
    assert read_tensorboard_scalars(str(tmp_path / "tb")) == {"tf2/loss": [(4, 3.25), (5, 2.5)], "v1/loss": [(6, 0.5)]}

    with open(path, "rb+") as f:  # a corrupt length field
        f.seek(0)
        f.write(struct.pack("<Q", 10**12))
    with pytest.raises(ValueError, match="corrupt record at byte 0"):
        read_tensorboard_scalars(str(tmp_path / "tb"))


# ----------------------------------------------------------------------------------------------------------
# StepTimer
# ----------------------------------------------------------------------------------------------------------


def test_step_timer_separates_the_compiling_first_step():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    assert timer.summary() == {
        "steps": 0,
        "first_step_s": None,
        "steady_step_s": None,
        "steps_per_s": None,
        "compile_estimate_s": None,
    }
    for seconds in (10.0, 1.0, 3.0):
        timer.start()
        clock.now += seconds
        assert timer.stop() == seconds
        if seconds == 10.0:
            assert timer.first_step_s == 10.0 and timer.steady_step_s is None and timer.compile_estimate_s is None
    assert timer.summary() == {
        "steps": 3,
        "first_step_s": 10.0,
        "steady_step_s": 2.0,
        "steps_per_s": 0.5,
        "compile_estimate_s": 8.0,
    }

    timer.reset()  # a new stage compiles again
    with timer.step():
        clock.now += 1.0
    with timer.step():
        clock.now += 4.0
    assert (timer.first_step_s, timer.steady_step_s, timer.steps_per_s) == (1.0, 4.0, 0.25)
    assert timer.compile_estimate_s == 0.0  # clamped: the first step was faster than the steady ones
    with pytest.raises(RuntimeError):
        timer.stop()


# ----------------------------------------------------------------------------------------------------------
# ProgressBar
# ----------------------------------------------------------------------------------------------------------


def test_progress_bar_on_a_log_file_prints_throttled_full_lines():
    clock, stream = FakeClock(100.0), io.StringIO()
    bar = ProgressBar(100, desc="[sft] sft", stream=stream, clock=clock)
    bar.update(1, {"loss": 0.123456, "other": 7.0})  # first step done at t=100 (compiled)
    clock.now = 104.0
    bar.update(2, {"loss": 0.1})  # 4 s after the last printed line: held back
    clock.now = 110.0
    bar.update(6, {"reward": 1.23456, "accuracy": 0.5, "loss": 0.1})  # 5 steps in 10 s after the first
    clock.now = 112.0
    bar.update(7, {"loss": 0.05})  # held back, printed by close()
    bar.close()
    assert stream.getvalue().splitlines() == [
        "[sft] sft 1/100 [1%] compiling… loss 0.123",
        "[sft] sft 6/100 [6%] 0.5 step/s reward 1.235 accuracy 0.500 loss 0.100 ETA 0:03:08",  # 94 steps / 0.5
        "[sft] sft 7/100 [7%] 0.5 step/s loss 0.050 ETA 0:03:06",  # 6 steps / 12 s; 93 / 0.5
    ]
    assert "\r" not in stream.getvalue()


def test_progress_bar_on_a_log_file_always_prints_the_last_step():
    clock, stream = FakeClock(), io.StringIO()
    bar = ProgressBar(4, stream=stream, clock=clock, keys=("loss",))
    for step in range(1, 5):
        clock.now += 1.0
        bar.update(step, {"loss": 1.0 / step})
    expected = ["1/4 [25%] compiling… loss 1.000", "4/4 [100%] 1 step/s loss 0.250 ETA 0:00:00"]
    assert stream.getvalue().splitlines() == expected  # before close(): the last step did not wait
    bar.close()
    assert stream.getvalue().splitlines() == expected


def test_progress_bar_on_a_terminal_rewrites_one_line():
    clock, stream = FakeClock(), FakeTTY()
    bar = ProgressBar(10, desc="run", stream=stream, clock=clock)
    bar.update(1, {"accuracy": 0.25})
    first = "run 1/10 [10%] compiling… accuracy 0.250"
    assert stream.getvalue() == "\r" + first
    clock.now = 4.0
    bar.update(3, {})  # 2 steps in 4 s after the first; 7 left
    second = "run 3/10 [30%] 0.5 step/s ETA 0:00:14"
    assert stream.getvalue() == "\r" + first + "\r" + second + " " * (len(first) - len(second))
    bar.close()
    assert stream.getvalue().endswith(second + " " * (len(first) - len(second)) + "\n")
    assert stream.getvalue().count("\n") == 1


def test_disabled_progress_bar_prints_nothing():
    for stream in (io.StringIO(), FakeTTY()):
        with ProgressBar(3, stream=stream, enabled=False, clock=FakeClock()) as bar:
            bar.update(1, {"loss": 1.0})
            bar.update(3, {"loss": 1.0})
        assert stream.getvalue() == ""


def test_format_duration_and_metric():
    assert format_duration(0) == "0:00:00"
    assert format_duration(83.4) == "0:01:23"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(26 * 3600 + 61) == "26:01:01"
    with pytest.raises(ValueError):
        format_duration(-1.0)
    assert [format_metric(v) for v in (0.5, 0, 2.0, 1.5e-5, 123456.0, float("nan"), np.float32(0.25), "sft")] == [
        "0.500",
        "0.000",
        "2.000",
        "1.5e-05",
        "1.235e+05",
        "nan",
        "0.250",
        "sft",
    ]
