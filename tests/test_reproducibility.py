"""A seeded run is bit-reproducible on one machine (docs/reproducibility.md).

The demo's stages (configs/demo.py), shrunk to a few steps, run twice from the same config and seed: once in this
process and once as `python -m jaxvlm.main` in a child process whose string hashes differ (another PYTHONHASHSEED), so
a per-process source (set or dict order over strings, `hash()`, the thread timing of the input pipeline's prefetch, a
global cache) would show. Every logged training and evaluation metric, every evaluation completion, every final
parameter and the recorded environment (`environment.json`) must be equal, bit for bit. Left out of the comparison:
wall-clock fields (each record's `time`, `*/time/*` and `time/*` timings).

Fast form: the SFT stage alone, 2 steps (its updates, then greedy decoding and scoring in its evaluation). Slow form
(`-m slow`): SFT 4 steps, then DyME 3 steps (sampled rollouts at temperature 0.7, rewards, the memorise / explore / skip
switch), with an evaluation and an asynchronous checkpoint inside each stage.

What these runs share and a run on another machine need not (CPU count, device count, CPU type, versions) is what
`jaxvlm.reproducibility` records; the last tests check that it records the two that change the numbers on one machine
(the CPUs a process may use and the forced device count) and that a resume under another environment says so.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import logging

from jaxvlm import reproducibility, trainer
from jaxvlm.metrics import read_metrics
from jaxvlm.models.checkpoint import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo's stages at test size: a few rows, short evaluations (each key is a `--config.` override).
SMALL = {
    "stages.sft.data.batch_size": 4,
    "stages.sft.data.prompt_buckets": (256,),  # one prompt width: each stage's step compiles once
    "stages.dyme.data.batch_size": 2,
    "stages.dyme.data.prompt_buckets": (256,),
    "stages.dyme.sampling.num_generations": 4,
    "stages.dyme.sampling.max_new_tokens": 96,  # the demo's: DyME tokenizes its references at this width
    "eval.num_examples": 4,
    "eval.batch_size": 4,
    "eval.sampling.max_new_tokens": 24,
    "train.log_every": 1,
    "train.progress": False,
    "train.tensorboard": False,
}
SLOW = {**SMALL, "stages.sft.steps": 4, "stages.dyme.steps": 3, "train.eval_every": 2, "train.save_every": 1}


def demo_config(overrides: dict):
    """configs/demo.py with `overrides` applied, as `--config.<key>=<value>` flags would apply them."""
    path = os.path.join(ROOT, "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("reproducibility_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def is_wall_clock(key: str) -> bool:
    return key == "time" or key.startswith("time/") or "/time/" in key


def comparable_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [{k: v for k, v in record.items() if not is_wall_clock(k)} for record in read_metrics(workdir)]


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """The exported final_model's tensors by name."""
    files = sorted(glob.glob(os.path.join(workdir, "final_model", "*.safetensors")))
    if not files:
        raise AssertionError(f"{workdir}/final_model holds no .safetensors file")
    tensors = {}
    for path in files:
        reader = SafetensorsFile(path)
        tensors.update({name: np.array(reader.get(name)) for name in reader.keys()})
    return tensors


def text_files(workdir: str, pattern: str) -> dict[str, str]:
    """The text of every file matching `pattern` under `workdir`, by path relative to it."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, pattern))):
        with open(path) as f:
            out[os.path.relpath(path, workdir)] = f.read()
    return out


def metric_differences(a: list[dict], b: list[dict]) -> list[str]:
    """Where two runs' comparable metrics differ: 'record i (step s): key a != b', in order."""
    if len(a) != len(b):
        return [f"{len(a)} records != {len(b)} records"]
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        for key in sorted(set(x) | set(y)):
            left, right = x.get(key, "<absent>"), y.get(key, "<absent>")
            if left != right:
                out.append(f"record {i} (step {x.get('step')}): {key} {left!r} != {right!r}")
    return out


def param_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Tensors whose names, shapes, dtypes or bits differ (bitwise: -0.0 != 0.0, NaN payloads count)."""
    if sorted(a) != sorted(b):
        return [f"tensor names differ: {sorted(set(a) ^ set(b))}"]
    out = []
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"{name}: {x.dtype}{list(x.shape)} != {y.dtype}{list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            bytes_x, bytes_y = x.view(np.uint8).reshape(x.size, -1), y.view(np.uint8).reshape(y.size, -1)
            unequal = int(np.any(bytes_x != bytes_y, axis=1).sum())
            gap = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
            out.append(f"{name}: {unequal} of {x.size} elements differ, max |difference| {gap:.3g}")
    return out


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment (device count, compilation cache) with another string-hash seed, and the matmul
    precision that conftest sets by jax.config (a child reads it from the environment)."""
    import jax

    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    precision = jax.config.jax_default_matmul_precision
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED=hash_seed, **extra)
    if precision is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
    return env


def run_in_child(overrides: dict, workdir: str) -> None:
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    command = [sys.executable, "-m", "jaxvlm.main", "--config", "configs/demo.py", "--workdir", workdir, *flags]
    proc = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def assert_same_run(here: str, child: str, overrides: dict) -> None:
    metrics_here, metrics_child = comparable_metrics(here), comparable_metrics(child)
    train = [r for r in metrics_here if "train/loss" in r]
    stages = overrides.get("stage_order", ("sft", "dyme"))
    steps = [(name, k) for name in stages for k in range(1, overrides[f"stages.{name}.steps"] + 1)]
    assert [(r["train/stage"], r["train/stage_step"]) for r in train] == steps, "the comparison needs every step logged"
    rl = [r for r in train if r["train/stage"] == "dyme"]
    assert all("train/reward" in r and "train/dyme/memorize_fraction" in r for r in rl), "DyME steps log their rollouts"
    assert any("eval/accuracy" in r for r in metrics_here)
    differences = metric_differences(metrics_here, metrics_child)
    assert not differences, "metrics differ (first 10):\n" + "\n".join(differences[:10])
    completions = text_files(here, "eval_completions/*.jsonl")
    assert completions and completions == text_files(child, "eval_completions/*.jsonl"), "eval completions differ"
    differences = param_differences(final_params(here), final_params(child))
    assert not differences, "final params differ:\n" + "\n".join(differences[:10])
    environment = text_files(here, reproducibility.ENVIRONMENT_FILE)
    assert environment and environment == text_files(child, reproducibility.ENVIRONMENT_FILE)


def run_twice_and_compare(tmp_path, overrides: dict) -> None:
    here, child = str(tmp_path / "here"), str(tmp_path / "child")
    assert trainer.run(demo_config(overrides), here)["finished"]
    run_in_child(overrides, child)
    assert_same_run(here, child, overrides)


@pytest.mark.slow  # two runs of two stages (~45 s on 2 cores)
def test_seeded_sft_then_dyme_with_evaluations_and_checkpoints_is_bitwise_identical(tmp_path):
    run_twice_and_compare(tmp_path, SLOW)
    with open(os.path.join(tmp_path, "here", "progress.json")) as f:
        assert json.load(f)["completed"] == {"sft": SLOW["stages.sft.steps"], "dyme": SLOW["stages.dyme.steps"]}


def test_the_child_process_hashes_strings_differently():
    """The child run's premise: its `hash()` of a string is not this process's."""
    command = [sys.executable, "-c", "print(hash('jaxvlm reproducibility'))"]
    out = subprocess.run(command, env=child_env(), capture_output=True, text=True, check=True)
    assert int(out.stdout) != hash("jaxvlm reproducibility")


def test_the_comparisons_see_one_bit_and_one_digit():
    """The comparison helpers are not vacuous: one ulp in one element, a sign of zero and one metric's last digit."""
    params = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, np.float32)}
    nudged = {name: value.copy() for name, value in params.items()}
    nudged["a"][2, 3] = np.nextafter(np.float32(1), np.float32(2))  # the element that is 1.0: one ulp is 2**-23
    assert param_differences(params, {name: value.copy() for name, value in params.items()}) == []
    assert param_differences(params, nudged) == ["a: 1 of 12 elements differ, max |difference| 1.19e-07"]
    assert param_differences(params, dict(params, b=-params["b"])) == ["b: 3 of 3 elements differ, max |difference| 0"]
    first = {"step": 1, "train/loss": 6.083819389343262, "time": 1.0, "train/time/step_s": 0.5, "time/steps": 2}
    second = {"step": 1, "train/loss": 6.08381986618042, "time": 2.0, "train/time/step_s": 0.7, "time/steps": 2}
    first, second = ({k: v for k, v in r.items() if not is_wall_clock(k)} for r in (first, second))
    assert metric_differences([first], [second]) == [
        "record 0 (step 1): train/loss 6.083819389343262 != 6.08381986618042"
    ]


def child_environment(preamble: str, **env: str) -> dict:
    """`numerics_environment()` as a fresh interpreter sees it after running `preamble` (before jax starts)."""
    report = (
        "import json\nfrom jaxvlm import reproducibility\nprint(json.dumps(reproducibility.numerics_environment()))"
    )
    code = f"{preamble}\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(**env), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_the_environment_records_the_cpus_and_the_device_count_a_process_has():
    """The two fields that change the numbers on one machine (docs/reproducibility.md): the CPUs the process may run
    on (XLA:CPU's thread pool) and a forced host device count."""
    first_cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if first_cpu is None:
        pytest.skip("no sched_setaffinity on this platform")
    pinned = child_environment(
        f"import os; os.sched_setaffinity(0, {{{first_cpu}}})",
        XLA_FLAGS="--xla_force_host_platform_device_count=3",
    )
    assert pinned["schedulable_cpus"] == 1
    assert pinned["devices"] == 3 and pinned["xla_flags"] == "--xla_force_host_platform_device_count=3"
    assert pinned["backend"] == "cpu" and pinned["jax"] and pinned["jaxlib"] and pinned["cpu_model"]


def test_a_rerun_in_another_environment_names_what_changed(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    first = {"jax": "0.10.2", "devices": 1, "schedulable_cpus": 2}
    assert reproducibility.record_environment(workdir, first) == []
    assert reproducibility.record_environment(workdir, dict(first)) == []
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda message, *args: warnings.append(message % args))
    moved = dict(first, schedulable_cpus=1, xla_flags="--xla_force_host_platform_device_count=8")
    changes = reproducibility.record_environment(workdir, moved)
    assert changes == [
        "schedulable_cpus: 2 -> 1",
        "xla_flags: '<absent>' -> '--xla_force_host_platform_device_count=8'",
    ]
    assert len(warnings) == 1 and "schedulable_cpus: 2 -> 1" in warnings[0] and "not bit-identical" in warnings[0]
    with open(os.path.join(workdir, reproducibility.ENVIRONMENT_FILE)) as f:
        assert json.load(f) == moved  # the file describes the latest start
    with open(os.path.join(workdir, reproducibility.ENVIRONMENT_FILE), "w") as f:
        f.write("{not json")
    assert reproducibility.record_environment(workdir, moved)[0].startswith("devices: '<absent>' -> 1")
