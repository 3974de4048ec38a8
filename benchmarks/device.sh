#!/usr/bin/env bash
# One accelerator session in one script (H100/H200, no network, < 8 minutes): checks the
# machine, runs the kernel tests on the real GPU (not Pallas interpret mode), then
# benchmarks/device_bench.py. Everything lands under $OUT (default /tmp/ferrum-device):
#   machine.txt      nvidia-smi, jax devices, versions
#   tests.log        pytest of the attention kernels and the ragged step against HF
#   device_bench.json, bench.log
# Python packages the device image lacks (gguf) travel as wheels in .whl/ (see the device
# notes); this script installs them when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ferrum-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CI=true
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package-dir mapping (ferrum_jax.models -> models/) needs an install, not a PYTHONPATH.
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
} | tee "$OUT/machine.txt"
$PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" \
    || { echo "no GPU backend: not running the device checks"; exit 1; }

status=0
timeout 180 $PY -m pytest -q -x -p no:cacheprovider tests/test_attention.py tests/test_ragged.py \
    2>&1 | tee "$OUT/tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 300 $PY benchmarks/device_bench.py --out "$OUT/device_bench.json" 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^W0000"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
