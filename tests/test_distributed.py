"""Multi-controller JAX: 2 processes x 4 CPU devices reproduce the single-process 8-device steps."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxvlm import distributed, sharding

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    assert jax.device_count() >= 8, "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    from multihost_worker import run_steps

    out, port = str(tmp_path / "params.npz"), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAXVLM_"))}
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port), out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    expected_params, expected_metrics = run_steps()  # meanwhile, in this process on 8 local devices
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    got = np.load(out)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(expected_params)[0]
    }
    assert set(got.files) == set(flat)
    for name, value in flat.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    with open(out + ".json") as f:
        metrics = json.load(f)
    for step, values in expected_metrics.items():
        for key, value in values.items():
            np.testing.assert_allclose(metrics[step][key], value, atol=1e-5, rtol=1e-5, err_msg=f"{step}/{key}")


def test_single_process_initialize_is_a_noop_and_env_is_validated(monkeypatch):
    for var in (
        "JAXVLM_COORDINATOR",
        "JAXVLM_NUM_PROCESSES",
        "JAXVLM_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    info = distributed.initialize()
    assert info["process_count"] == 1 and info["global_devices"] == jax.device_count()
    monkeypatch.setenv("JAXVLM_COORDINATOR", "localhost:1234")
    with pytest.raises(ValueError, match="JAXVLM_NUM_PROCESSES"):
        distributed.initialize()
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("localhost:1", 2, 5)


def test_local_rows_follow_the_sharding():
    mesh = sharding.make_mesh((2, 4, 1))
    s = jax.NamedSharding(mesh, jax.P(None, ("data", "fsdp")))
    assert distributed.local_rows(s, (3, 16), axis=1) == slice(0, 16)  # one process holds every row
