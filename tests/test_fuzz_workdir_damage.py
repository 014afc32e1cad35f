"""Fuzzing the workdir's damage handling with seeded random damage: a checkpoint's latest step (any file or directory
deleted, truncated, overwritten, flipped or extended), progress.json bytes and the lock file's content. No case may
crash: each ends intact, as a named fallback, or as one clear error. JAXVLM_FULL_TESTS=1 runs 1,000 cases per surface.

Each test prints its tally (run with -s to see it): cases, outcomes, crashes and the slowest case's wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np

from jaxvlm import runtime
from jaxvlm.checkpoint import CheckpointError, TrainCheckpointer, abstract_like
from test_train_checkpoint import (
    collect_orbax_coroutines,  # noqa: F401 - the fixture orbax_unraisable uses
    damage_state,
    orbax_unraisable,
    two_steps,
)

N = 1000 if os.environ.get("JAXVLM_FULL_TESTS") == "1" else 12
MUTATIONS = ("delete", "truncate", "empty", "overwrite", "flip", "append", "delete_directory")


def tally_line(surface: str, outcomes: dict[str, int], slowest: tuple[float, int]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    return f"[fuzz {surface}] {sum(outcomes.values())} cases: {counts}; slowest case {slowest[1]}: {slowest[0]:.3f} s"


def mutate(step_dir: str, rng: np.random.Generator) -> tuple[str, str, bool]:
    """Damages one file (or directory) of `step_dir` at random: (its path in the step, the mutation, whether it left
    the file's size unchanged, which only an array data file's own checksum could catch, and it has none)."""
    paths = [os.path.join(r, f) for r, _, names in os.walk(step_dir) for f in names]
    # Data files are named by random hashes: order by directory and size so that a seed picks the same file each run.
    paths.sort(key=lambda p: (os.path.dirname(p), os.path.getsize(p), p))
    files = [os.path.relpath(p, step_dir) for p in paths]
    mutation = MUTATIONS[rng.integers(len(MUTATIONS))]
    if mutation == "delete_directory":
        dirs = sorted(os.path.relpath(r, step_dir) for r, _, _ in os.walk(step_dir) if r != step_dir)
        target = dirs[rng.integers(len(dirs))]
        shutil.rmtree(os.path.join(step_dir, target))
        return target, mutation, False
    target = files[rng.integers(len(files))]
    path = os.path.join(step_dir, target)
    data = open(path, "rb").read()
    if mutation == "delete":
        os.remove(path)
        return target, mutation, False
    if mutation == "truncate":
        data = data[: rng.integers(len(data))] if data else data
    elif mutation == "empty":
        data = b""
    elif mutation == "overwrite" and data:
        start = int(rng.integers(len(data)))
        stop = int(rng.integers(start, len(data))) + 1
        data = data[:start] + rng.integers(0, 256, stop - start, dtype=np.uint8).tobytes() + data[stop:]
    elif mutation == "flip" and data:
        at = int(rng.integers(len(data)))
        data = data[:at] + bytes([data[at] ^ (1 << int(rng.integers(8)))]) + data[at + 1 :]
    elif mutation == "append":
        data = data + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return target, mutation, mutation in ("overwrite", "flip")


def leaves_equal(a, b) -> bool:
    def raw(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    return all(np.array_equal(raw(x), raw(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@orbax_unraisable
def test_fuzz_damaged_latest_checkpoint_step(tmp_path):
    """Outcomes: `intact` (step 2 restored, equal to what was saved: the damage did not matter, e.g. a commit
    marker), `fallback` (step 1 restored, step 2 set aside with named problems), `clear_error` (CheckpointError),
    `silent` (step 2 restored with other values: bytes changed in place inside array data or a JSON value, which
    nothing checksums; counted, and only allowed for in-place changes). Anything else is a crash."""
    state = damage_state()
    saved = {1: state, 2: {**state, "w": state["w"] + 1, "b": state["b"] + 1}}
    two_steps(tmp_path / "base", state)
    outcomes: dict[str, int] = {}
    crashes, slowest = [], (0.0, -1)
    for case in range(N):
        rng = np.random.default_rng(case)
        directory = tmp_path / f"case{case}"
        shutil.copytree(tmp_path / "base", directory)
        target, mutation, in_place = mutate(str(directory / "2"), rng)
        start = time.perf_counter()
        try:
            with TrainCheckpointer(directory, save_every=1) as ckpt:
                restored, data_state, _ = ckpt.restore(abstract_like(state), required_items={"data_state": ("step",)})
                set_aside = list(ckpt.set_aside)
            if set_aside:
                named = [d.step for d in set_aside] == [2] and all(d.problems for d in set_aside)
                fell_back = data_state == {"step": 1} and leaves_equal(restored, saved[1])
                outcome = "fallback" if named and fell_back and (directory / "2.damaged").is_dir() else "crash"
            elif data_state == {"step": 2} and leaves_equal(restored, saved[2]):
                outcome = "intact"
            else:
                outcome = "silent" if in_place else "crash (restored other values without a word)"
        except CheckpointError:
            outcome = "clear_error"
        except Exception as e:  # noqa: BLE001 - a crash is what this test counts
            outcome = f"crash ({type(e).__name__}: {str(e)[:200]})"
        elapsed = time.perf_counter() - start
        slowest = max(slowest, (elapsed, case))
        if outcome.startswith("crash"):
            crashes.append(f"case {case}: {mutation} {target}: {outcome}")
            outcome = "crash"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(directory)
    print(tally_line("checkpoint step", outcomes, slowest))
    assert not crashes, "\n".join(crashes)


VALID_PROGRESS = {"completed": {"sft": 2, "grpo": 10}}


def random_json_value(rng: np.random.Generator, depth: int = 0):
    kind = int(rng.integers(8 if depth < 3 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(2))
    if kind == 2:
        return int(rng.integers(-5, 1_000_000))
    if kind == 3:
        return float(rng.normal())
    if kind == 4:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 6))))
    if kind == 5:
        return ["sft", "grpo", "completed", ""][int(rng.integers(4))]
    if kind == 6:
        return [random_json_value(rng, depth + 1) for _ in range(int(rng.integers(3)))]
    keys = ["completed", "sft", "grpo", "x"]
    return {keys[int(rng.integers(4))]: random_json_value(rng, depth + 1) for _ in range(int(rng.integers(3)))}


def random_progress_bytes(rng: np.random.Generator) -> bytes:
    """A valid progress file, one with random structure, or a valid one with random bytes changed / cut."""
    valid = json.dumps(VALID_PROGRESS).encode()
    kind = int(rng.integers(4))
    if kind == 0:
        return json.dumps(random_json_value(rng)).encode()
    if kind == 1:
        return json.dumps({"completed": {"sft": random_json_value(rng)}}).encode()
    if kind == 2:
        return valid[: int(rng.integers(len(valid) + 1))]
    at = int(rng.integers(len(valid)))
    return valid[:at] + rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes() + valid[at + 1 :]


def test_fuzz_progress_file(tmp_path):
    """Outcomes: `loaded` (a well-formed progress dict), `clear_error` (WorkdirError naming the file)."""
    path = tmp_path / runtime.PROGRESS_FILE
    outcomes: dict[str, int] = {}
    crashes, slowest = [], (0.0, -1)
    for case in range(N):
        content = random_progress_bytes(np.random.default_rng(case))
        path.write_bytes(content)
        start = time.perf_counter()
        try:
            progress = runtime.load_progress(str(tmp_path))
            steps = progress["completed"].values()
            ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)
            outcome = "loaded" if ok else "crash (loaded a malformed progress dict)"
        except runtime.WorkdirError as e:
            outcome = "clear_error" if str(e).startswith(f"{path}: ") else f"crash (error without the path: {e})"
        except Exception as e:  # noqa: BLE001 - a crash is what this test counts
            outcome = f"crash ({type(e).__name__}: {e})"
        slowest = max(slowest, (time.perf_counter() - start, case))
        if outcome.startswith("crash"):
            crashes.append(f"case {case}: {content!r}: {outcome}")
            outcome = "crash"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(tally_line("progress.json", outcomes, slowest))
    assert not crashes, "\n".join(crashes)


def random_lock_content(rng: np.random.Generator, dead_pid: int) -> bytes:
    """A stale lock file (no live holder): random bytes, a cut record, or a record with random fields."""
    record = {"pid": dead_pid, "host": runtime.LockHolder.current().host, "since": "2026-01-02T03:04:05+00:00"}
    kind = int(rng.integers(4))
    if kind == 0:
        return rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
    if kind == 1:
        text = json.dumps(record).encode()
        return text[: int(rng.integers(len(text) + 1))]
    if kind == 2:
        record["host"] = ["elsewhere", record["host"], "", 7][int(rng.integers(4))]
    else:
        record[["pid", "host", "since"][int(rng.integers(3))]] = random_json_value(rng)
    return json.dumps(record).encode()


def test_fuzz_stale_lock_file(tmp_path):
    """Nobody holds the lock: `taken_over` (ours now) or `clear_error` (another host's record: WorkdirError saying
    to delete the file, which is left as it was)."""
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    path = tmp_path / runtime.LOCK_FILE
    outcomes: dict[str, int] = {}
    crashes, slowest = [], (0.0, -1)
    for case in range(N):
        content = random_lock_content(np.random.default_rng(case), dead_pid)
        path.write_bytes(content)
        start = time.perf_counter()
        try:
            with runtime.WorkdirLock(str(tmp_path)):
                mine = json.loads(path.read_text())["pid"] == os.getpid()
            outcome = "taken_over" if mine and not path.exists() else "crash (not ours, or not removed)"
        except runtime.WorkdirError as e:
            kept = path.read_bytes() == content
            outcome = "clear_error" if kept and f"delete {path}" in str(e) else f"crash (unclear refusal: {e})"
        except Exception as e:  # noqa: BLE001 - a crash is what this test counts
            outcome = f"crash ({type(e).__name__}: {e})"
        slowest = max(slowest, (time.perf_counter() - start, case))
        if outcome.startswith("crash"):
            crashes.append(f"case {case}: {content!r}: {outcome}")
            outcome = "crash"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        path.unlink(missing_ok=True)
    print(tally_line("train.lock", outcomes, slowest))
    assert not crashes, "\n".join(crashes)
