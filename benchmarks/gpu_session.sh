#!/usr/bin/env bash
# Everything a lent GPU session checks and measures, in one call (see benchmarks/README.md):
#   run: bash benchmarks/gpu_session.sh   with carry [".whl"]   (after benchmarks/fetch_wheels.sh here)
# 1. install lossgraph (and the carried wheels) without network;
# 2. the fused-kernel tests on the GPU (no interpreter): every loss and source type, linear heads,
#    vocab parallel;
# 3. lossgraph bench, cases a-e, results in $OUT/bench.json and $OUT/bench.txt.
set -uo pipefail
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
python3 - <<'PY' | tee "$OUT/environment.txt"
import torch, triton
print("card:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
PY
timeout 330 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_backend.py tests/test_linear_heads.py \
    tests/test_distributed.py tests/test_fusion_plan.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
COLUMNS=160 timeout 420 python3 -m lossgraph bench a b c d e --device cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
