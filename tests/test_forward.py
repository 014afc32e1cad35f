"""The forward smoke check's command line (`python -m jaxvlm.bench.forward --config configs/forward.py`) as a user
runs it."""

import json
import os
import subprocess
import sys

import pytest

from jaxvlm.models.config import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxvlm.bench.forward", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_forward_config_runs_and_writes_result(tmp_path):
    proc = run_main("--config", "configs/forward.py", "--workdir", str(tmp_path), "--config.demo.batch_size=4")
    result = json.loads((tmp_path / "forward.json").read_text())
    assert result["batch"][0] == 4
    assert result["logits_shape"] == [4, result["batch"][1], 1024]
    assert result["image_patches"] > 0 and result["logits_finite"]
    assert "jaxvlm forward" in proc.stdout


@pytest.mark.slow
def test_main_loads_a_checkpoint_directory(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["gqa6_untied_win112"]
    run_main(
        "--config",
        os.path.join(ROOT, "configs/forward.py"),
        "--workdir",
        str(tmp_path),
        "--config.model.preset=",
        f"--config.model.path={path}",
        "--config.model.dtype=bfloat16",
        "--config.model.param_dtype=float32",
        cwd=str(tmp_path),
    )
    result = json.loads((tmp_path / "forward.json").read_text())
    assert result["logits_shape"][-1] == 300 and result["logits_finite"]


def test_unknown_config_field_is_rejected(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxvlm.bench.forward", "--config", "configs/forward.py", "--config.model.presett=tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "presett" in proc.stderr


@pytest.mark.parametrize("preset", ["nonexistent"])
def test_unknown_preset_is_named(preset):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxvlm.bench.forward",
            "--config",
            "configs/forward.py",
            f"--config.model.preset={preset}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: config.model.preset: must be one of {tuple(PRESETS)} (or '' with model.path), got {preset!r}"
    ]
