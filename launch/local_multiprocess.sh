#!/usr/bin/env bash
# Run jaxvlm as NPROC local processes (JAX multi-controller), each with DEVICES simulated CPU devices.
# Exercises exactly the code path of a multi-host TPU/GPU run on one machine.
#   NPROC=2 DEVICES=4 launch/local_multiprocess.sh --config configs/demo.py --workdir /tmp/run
set -euo pipefail
NPROC=${NPROC:-2}
DEVICES=${DEVICES:-4}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" \
  JAXVLM_COORDINATOR="localhost:${PORT}" JAXVLM_NUM_PROCESSES="${NPROC}" JAXVLM_PROCESS_ID="${i}" \
    python -m jaxvlm.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
