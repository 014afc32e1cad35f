"""A damaged or contested workdir: a damaged checkpoint step is named, counted and skipped and the run resumes to the
same end; a finished stage whose final checkpoint is damaged is reopened; no intact step, a damaged progress.json and
a second trainer on the workdir are one clear error each; a stale lock is taken over."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxvlm import models, runtime, trainer
from jaxvlm.checkpoint import CheckpointError
from jaxvlm.metrics import read_metrics
from test_train_checkpoint import (
    collect_orbax_coroutines,  # noqa: F401 - the fixture orbax_unraisable uses
    largest_file,
    orbax_unraisable,
    truncate_half,
)
from test_trainer import ROOT, sft_grpo_config

HOST = socket.gethostname()
SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def sft_config():
    """The trainer tests' tiny SFT stage alone: 2 steps, a checkpoint after each."""
    c = sft_grpo_config(steps=2)
    c.stage_order = ("sft",)
    return c


def progress(workdir) -> dict:
    with open(os.path.join(workdir, "progress.json")) as f:
        return json.load(f)


def final_params(workdir):
    return jax.tree.leaves(models.load_pretrained(os.path.join(workdir, "final_model"))[1])


def damage_array_data(workdir, step: int) -> None:
    """Truncates the largest array data file of the sft stage's checkpoint `step`."""
    truncate_half(largest_file(os.path.join(workdir, "checkpoints", "sft", str(step), "state", "ocdbt.process_0")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step SFT run (checkpoints 1 and 2); tests work on copies."""
    workdir = tmp_path_factory.mktemp("finished")
    assert trainer.run(sft_config(), str(workdir))["finished"]
    return workdir


def copy_of(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "w")
    return tmp_path / "w"


# --- damaged checkpoints in a run ---


@pytest.mark.slow  # trains (a 2-step run, then one step again)
@orbax_unraisable
def test_a_damaged_latest_step_is_named_counted_skipped_and_the_run_ends_as_undamaged(finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    os.remove(workdir / "progress.json")  # the stage resumes from its checkpoints instead of being skipped as done
    damage_array_data(workdir, 2)
    before = read_metrics(str(workdir))
    with caplog.at_level("WARNING"):
        assert trainer.run(sft_config(), str(workdir))["finished"]
    assert re.search(
        r"checkpoints/sft/2 is damaged, using step 1 instead; moved to \S+/sft/2\.damaged\. "
        r"state/ocdbt\.process_0/d/\w+: truncated \(\d+ bytes; the index refers to bytes up to \d+\)",
        caplog.text,
    )
    new = read_metrics(str(workdir))[len(before) :]
    [counted] = [r for r in new if "checkpoint/restore_fallbacks" in r]
    assert counted["step"] == 1 and counted["checkpoint/stage"] == "sft"
    assert counted["checkpoint/restore_fallbacks"] == 1 and counted["checkpoint/damaged_steps"] == "2"
    # Step 2 is trained again from step 1's checkpoint: the same loss, the same final model, bit for bit.
    redone = [r for r in new if "train/loss" in r]
    assert [r["train/stage_step"] for r in redone] == [2]
    assert redone[0]["train/loss"] == next(r["train/loss"] for r in before if r.get("train/stage_step") == 2)
    for x, y in zip(final_params(finished), final_params(workdir)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert progress(workdir) == {"completed": {"sft": 2}}
    assert sorted(os.listdir(workdir / "checkpoints" / "sft")) == ["1", "2", "2.damaged"]


@pytest.mark.slow  # trains (a 2-step run, then one step again)
@orbax_unraisable
def test_a_finished_stage_whose_final_checkpoint_is_damaged_is_reopened_and_finished_again(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    damage_array_data(workdir, 2)
    # Re-running the finished run exports the stage's final params: they are damaged, and step 1's are not final.
    with pytest.raises(
        CheckpointError,
        match=r"stage 'sft' finished, but its final checkpoint is damaged: step 2: state/ocdbt\.process_0/d/\w+: "
        r"truncated .*\(moved to \S+/sft/2\.damaged\)\. The stage is not marked done: re-run the same command to "
        r"resume it from its newest intact step, 1, to its end",
    ):
        trainer.run(sft_config(), str(workdir))
    assert progress(workdir) == {"completed": {}}
    assert not (workdir / runtime.LOCK_FILE).exists()  # released on the error
    assert trainer.run(sft_config(), str(workdir))["finished"]
    assert progress(workdir) == {"completed": {"sft": 2}}
    for x, y in zip(final_params(finished), final_params(workdir)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # needs the trained run
def test_no_intact_step_stops_the_run_listing_every_step_and_moves_nothing(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    damage_array_data(workdir, 2)
    os.remove(workdir / "checkpoints" / "sft" / "1" / "data_state" / "metadata")
    os.remove(workdir / "progress.json")
    sft = workdir / "checkpoints" / "sft"
    with pytest.raises(CheckpointError) as error:
        trainer.run(sft_config(), str(workdir))
    lines = str(error.value).splitlines()
    assert lines[0] == f"no intact checkpoint in {sft}; every step is damaged:"
    assert re.fullmatch(r"  step 2: state/ocdbt\.process_0/d/\w+: truncated .*", lines[1]), lines[1]
    assert lines[2:] == [
        "  step 1: data_state/metadata: missing",
        f"Nothing was moved. Restore these steps from a copy, or delete them to start over without them (the run then "
        f"trains this stage from its first step): rm -r {sft / '2'} {sft / '1'}",
    ]
    assert sorted(os.listdir(sft)) == ["1", "2"]


@pytest.mark.slow  # needs the trained run
def test_without_progress_json_a_finished_stage_is_restored_not_trained_again(finished, tmp_path):
    """What the damaged-progress error tells the user to do is safe: the checkpoints say how far each stage got."""
    workdir = copy_of(finished, tmp_path)
    os.remove(workdir / "progress.json")
    before = len(read_metrics(str(workdir)))
    assert trainer.run(sft_config(), str(workdir))["finished"]
    assert len(read_metrics(str(workdir))) == before
    assert progress(workdir) == {"completed": {"sft": 2}}


# --- a damaged progress.json ---


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"completed": {"sft": 2}', r"not valid JSON \(24 bytes; Expecting ',' delimiter: line 1 column 25\)"),
        (b"", r"not valid JSON \(0 bytes; Expecting value: line 1 column 1\)"),
        (b'\xff{"completed": {}}', r"not UTF-8 text \(18 bytes; invalid start byte at byte 0\)"),
        (b"[1, 2]", r"holds a JSON list, not an object"),
        (b'{"done": {}}', r'"completed" must be an object of stage: steps; got nothing'),
        (b'{"completed": ["sft"]}', r'"completed" must be an object of stage: steps; got list'),
        (b'{"completed": {"sft": "2"}}', r"\"completed\".\"sft\" must be a step count \(an integer >= 0\); got '2'"),
        (b'{"completed": {"sft": true}}', r'"completed"."sft" must be a step count \(an integer >= 0\); got True'),
        (b'{"completed": {"sft": -1}}', r'"completed"."sft" must be a step count \(an integer >= 0\); got -1'),
    ],
)
def test_a_damaged_progress_file_is_one_error_naming_it_and_the_fix(tmp_path, content, problem):
    (tmp_path / "progress.json").write_bytes(content)
    with pytest.raises(runtime.WorkdirError) as error:
        trainer.run(sft_config(), str(tmp_path))  # stops before anything is built
    assert re.fullmatch(
        re.escape(f"{tmp_path / 'progress.json'}: ")
        + problem
        + re.escape(
            '. It records the training stages that are done, as {"completed": {"<stage>": <steps>}}. Delete it and '
            f"re-run the same command: every stage is resumed from its own checkpoints ({tmp_path / 'checkpoints'}"
            "/<stage>), so a finished stage is restored, not trained again"
        ),
        str(error.value),
    ), str(error.value)
    assert not (tmp_path / runtime.LOCK_FILE).exists()  # released on the error


def test_a_valid_progress_file_loads():
    assert runtime.progress_problem(b'{"completed": {"sft": 2, "grpo": 0}}') is None
    assert runtime.progress_problem(b'{"completed": {}, "other": 1}') is None


# --- one trainer per workdir ---

HOLD_LOCK = "import sys; from jaxvlm.runtime import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()"  # noqa: E501


def holder_process(workdir):
    """A child process holding the workdir lock until its stdin closes (then it exits without releasing it)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert child.stdout.readline() == b"locked\n"
    return child


def test_a_second_trainer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    child = holder_process(tmp_path)
    try:
        with pytest.raises(runtime.WorkdirError) as error:
            trainer.run(sft_config(), str(tmp_path))
        assert re.fullmatch(
            rf"workdir {re.escape(str(tmp_path))} is in use by another trainer: pid {child.pid}@{re.escape(HOST)} "
            rf"since {SINCE} \(lock file {re.escape(str(tmp_path / 'train.lock'))}\)",
            str(error.value),
        ), str(error.value)
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    # The holder died without releasing: its lock file stays, naming a pid that no longer runs. It is taken over.
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == child.pid
    with caplog.at_level("WARNING"), runtime.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    assert re.search(rf"taking over the stale lock of pid {child.pid}@{re.escape(HOST)} since {SINCE}", caplog.text)
    assert not (tmp_path / "train.lock").exists()


def test_the_lock_is_held_for_the_run_and_by_this_process_too(tmp_path):
    with runtime.WorkdirLock(str(tmp_path)):
        with pytest.raises(runtime.WorkdirError, match=rf"in use by another trainer: pid {os.getpid()}@"):
            runtime.WorkdirLock(str(tmp_path)).acquire()
    with runtime.WorkdirLock(str(tmp_path)):  # released: free again
        pass


def test_a_lock_file_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    record = {"pid": 4242, "host": "elsewhere-host", "since": "2026-01-02T03:04:05+00:00"}
    (tmp_path / "train.lock").write_text(json.dumps(record))
    with pytest.raises(runtime.WorkdirError) as error:
        trainer.run(sft_config(), str(tmp_path))
    assert str(error.value) == (
        f"workdir {tmp_path} was locked by pid 4242@elsewhere-host since 2026-01-02T03:04:05+00:00, on another host: "
        f"whether that trainer still runs cannot be checked from {HOST}. If no trainer runs on this workdir, delete "
        f"{tmp_path / 'train.lock'} and re-run"
    )
    assert json.loads((tmp_path / "train.lock").read_text()) == record  # left as it was


def test_a_lock_being_written_is_held_and_an_unreadable_stale_one_is_taken_over(tmp_path, caplog):
    path = tmp_path / "train.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, nothing written yet
        with pytest.raises(runtime.WorkdirError, match=r"in use by another trainer: a trainer that is still writing"):
            runtime.WorkdirLock(str(tmp_path)).acquire()
    finally:
        os.close(fd)
    path.write_bytes(b"\x00garbage")
    with caplog.at_level("WARNING"), runtime.WorkdirLock(str(tmp_path)):
        pass
    assert "taking over a stale lock file whose content does not say who held it" in caplog.text


def test_without_flock_the_recorded_pid_says_whether_the_holder_runs(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "train.lock"
    path.write_text(json.dumps({"pid": os.getpid(), "host": HOST, "since": "2026-01-02T03:04:05+00:00"}))
    with pytest.raises(runtime.WorkdirError, match=rf"in use by another trainer: pid {os.getpid()}@"):
        runtime.WorkdirLock(str(tmp_path)).acquire()
    finished_child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = int(finished_child.stdout)
    path.write_text(json.dumps({"pid": dead, "host": HOST, "since": "2026-01-02T03:04:05+00:00"}))
    with runtime.WorkdirLock(str(tmp_path)):
        assert json.loads(path.read_text())["pid"] == os.getpid()


STOP_WITH_LOCK = """
import sys, time
from jaxvlm import runtime
with runtime.workdir_lock(sys.argv[1]), runtime.StopSignal() as stop:
    print("locked", flush=True)
    while not stop.requested():
        time.sleep(0.05)
"""


def test_sigterm_releases_the_lock_through_the_stop_signal(tmp_path):
    """SIGTERM sets the trainer's stop flag; the run returns and the lock file is removed, not left stale."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, "-c", STOP_WITH_LOCK, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline() == b"locked\n"
    assert (tmp_path / "train.lock").exists()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 0
    assert not (tmp_path / "train.lock").exists()


def test_the_command_line_refuses_a_held_workdir_in_one_line(tmp_path):
    with runtime.WorkdirLock(str(tmp_path)):
        done = subprocess.run(
            [sys.executable, "-m", "jaxvlm.main", "--config", "configs/demo.py", "--workdir", str(tmp_path)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.fullmatch(
        rf"error: workdir {re.escape(str(tmp_path))} is in use by another trainer: pid {os.getpid()}@"
        rf"{re.escape(HOST)} since {SINCE} \(lock file \S+train\.lock\)\n",
        done.stderr,
    ), done.stderr[-3000:]
