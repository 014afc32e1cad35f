#!/usr/bin/env bash
# Run jaxvlm on every worker of a Cloud TPU VM pod slice (one process per worker; JAX finds the other workers
# itself: jax.distributed.initialize() auto-detects TPU pods).
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh --config configs/dyme.py --workdir gs://bucket/run
# The repository must already be installed on every worker, e.g.:
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all \
#     --command "git clone <repo> jaxvlm && cd jaxvlm && pip install -c constraints.txt -e . 'jax[tpu]'"
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-jaxvlm}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && python -m jaxvlm.main${ARGS}"
