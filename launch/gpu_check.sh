#!/usr/bin/env bash
# GPU readiness on one H100 / H200, in under 10 minutes: the attention kernels' parity with cuDNN in the loop, then the
# 0.5b and 3b benchmarks (JAX side; the PyTorch baseline runs too where torch is installed).
#   launch/gpu_check.sh [OUT_DIR]          (default /tmp/jaxvlm-gpu-check; the benches' bench.json files land there)
# Needs jaxvlm installed with its test extras (pytest); no network, no downloads. The figures go to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/jaxvlm-gpu-check}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda,cpu  # tests/conftest.py defaults to CPU; the cuDNN tests run only on a GPU backend
python - <<'EOF'
import jax
assert jax.default_backend() == "gpu", f"no GPU backend: {jax.devices()}"
print("devices:", jax.devices())
EOF

echo "== attention: cuDNN and the XLA path against the dense reference (values and gradients)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_attention.py -k "cudnn or xla or reference" \
  2>&1 | tee "$OUT/attention_tests.txt" | tail -n 5

# Fewer timed repeats than the configs' defaults, so both benches fit the budget; medians still come from >= 3.
for variant in 0.5b 3b; do
  echo "== bench $variant"
  timeout 240 python -m jaxvlm.bench --config "configs/bench.py:$variant" --workdir "$OUT/bench-$variant" \
    --config.sft.steps=3 --config.grpo.steps=3 --config.decode.repeats=3 2>&1 | tee "$OUT/bench-$variant.txt" \
    | tail -n 45
done
echo "wrote $OUT"
