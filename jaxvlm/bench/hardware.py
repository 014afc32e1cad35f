"""The machine: its peak (nominal dense FLOP/s and memory bandwidth on known GPUs, a measured matmul peak on CPU),
and how loaded it is (the load average, read at the start and end of a run)."""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp

# (substring of jax's device_kind, dense bf16 FLOP/s, HBM bytes/s): NVIDIA datasheets. Order
# matters: the first match wins ("H100 PCIe" before "H100").
GPUS = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("H800", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
    ("GH200", 989e12, 4.0e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100", 312e12, 1.555e12),
    ("B200", 2250e12, 8.0e12),
)


def gpu_spec(device_kind: str) -> tuple[float, float] | None:
    """(nominal dense bf16 FLOP/s, HBM bandwidth) of a GPU named like jax's device_kind, or None if unknown."""
    for name, flops, bandwidth in GPUS:
        if name.lower() in device_kind.lower():
            return flops, bandwidth
    return None


def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted [size, size] x [size, size] matmuls (2 size^3 FLOPs each), on the
    default device: the CPU's attainable peak for dense work in this process (threads, vector units, dtype)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measured_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` jitted sums over a float32 array of `megabytes` (read once, far larger than
    the caches): the memory bandwidth a decode step can hope for on this machine."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 4 * n / best


def describe() -> dict:
    """What the results were measured on."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "host": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def peak(dtype: str, matmul_size: int = 2048) -> dict:
    """The MFU denominator and the decode roofline's bandwidth: a GPU's nominal dense bf16 peak and HBM bandwidth
    (fp32 runs on a GPU are also measured against the bf16 peak, as verl does), else both measured now."""
    device = jax.devices()[0]
    spec = gpu_spec(device.device_kind) if device.platform == "gpu" else None
    if spec is not None:
        return {"flops": spec[0], "bandwidth": spec[1], "source": f"nominal dense bf16 ({device.device_kind})"}
    flops = measured_matmul_peak(dtype, matmul_size)
    return {
        "flops": flops,
        "bandwidth": measured_read_bandwidth(),
        "source": f"measured: jitted {matmul_size}x{matmul_size} {dtype} matmul on {device.device_kind}; "
        "bandwidth: a jitted sum over 512 MiB",
    }


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (`os.getloadavg`): runnable processes, averaged. NaN where the
    platform has none."""
    try:
        return [float(x) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return [float("nan")] * 3


def load_warning(load: list[float], cpus: int | None) -> str | None:
    """A warning when the 1-minute load exceeds the CPU count: other processes then compete for the cores, and they
    slow the two sides unequally (a thread pool sized to the cores suffers most), so a ratio says little."""
    if not cpus or not load[0] > cpus:
        return None
    return (
        f"WARNING: 1-minute load average {load[0]:.2f} at the start exceeds the {cpus} CPUs: other work competes "
        "for the cores, so the ratios below are not trustworthy"
    )
