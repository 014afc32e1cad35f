#!/usr/bin/env bash
# Run jaxvlm on N simulated CPU devices (default 8), to exercise meshes and sharding without an accelerator:
#   N=4 launch/cpu_devices.sh --config configs/demo.py --workdir /tmp/jaxvlm-cpu4
set -euo pipefail
N="${N:-8}"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${N} ${XLA_FLAGS:-}"
exec python -m jaxvlm.main "$@"
