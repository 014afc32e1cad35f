"""What a seeded run's numbers depend on besides its config and seed, recorded in `<workdir>/environment.json`.

A seeded run repeats bit for bit in the same environment (docs/reproducibility.md): same jax / jaxlib, same backend
and device kind, same device count, and on the CPU the same number of CPUs the process may run on. XLA:CPU sizes its
thread pool from the schedulable CPUs and the device count (`--xla_force_host_platform_device_count`), and its
compiler splits loops and reductions over that many threads, so another count sums in another order and the last bits
of a loss differ, a difference that training amplifies. Machine load does not change the numbers; these fields do.

`record_environment` writes the file at every start of a run; when a re-run (a resume) finds other values there, it
logs which fields changed: the resumed steps are then not the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import os
import platform

import jax
from absl import logging

ENVIRONMENT_FILE = "environment.json"


# The vector instruction sets XLA:CPU compiles for when it finds them (a virtual machine often names its CPU only
# generically, so the model name alone does not say which code the compiler emits).
VECTOR_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line's value in /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else `platform.processor()`, else the architecture)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_vector_isa() -> str:
    """The `VECTOR_ISA_FLAGS` the CPU reports, space-separated in that order ('' where /proc/cpuinfo is absent)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return " ".join(flag for flag in VECTOR_ISA_FLAGS if flag in flags)


def schedulable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: `taskset`, a container's cpuset), which XLA:CPU uses."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def numerics_environment() -> dict[str, str | int]:
    """The fields a seeded run's numbers depend on besides its config (JSON-serialisable)."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "schedulable_cpus": schedulable_cpus(),
        "cpu_model": cpu_model(),
        "cpu_vector_isa": cpu_vector_isa(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def changed_fields(before: dict, now: dict) -> list[str]:
    """'field: before -> now' for every field whose value differs (absent on one side included), sorted by field."""
    missing = "<absent>"
    return [
        f"{key}: {before.get(key, missing)!r} -> {now.get(key, missing)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key, missing) != now.get(key, missing)
    ]


def record_environment(workdir: str, environment: dict | None = None) -> list[str]:
    """Write `environment` (default: `numerics_environment()`) to `<workdir>/environment.json`; returns the fields
    that differ from the file an earlier start of this workdir wrote (empty for a new workdir), and logs them."""
    environment = numerics_environment() if environment is None else environment
    path = os.path.join(workdir, ENVIRONMENT_FILE)
    changes: list[str] = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError) as error:
            before = {"unreadable": f"{type(error).__name__}: {error}"}
        changes = changed_fields(before if isinstance(before, dict) else {"unreadable": repr(before)}, environment)
    if changes:
        logging.warning(
            "%s: this workdir was last run in another environment (%s); steps run from here are not bit-identical "
            "to an uninterrupted run in the earlier one (docs/reproducibility.md)",
            path,
            "; ".join(changes),
        )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(environment, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return changes
