#!/usr/bin/env bash
# Everything a lent GPU session checks and measures, in ONE device call of at most 9 minutes on a fresh
# machine (see benchmarks/README.md):
#   run: bash benchmarks/gpu_session.sh   with carry [".whl"] and timeout_s 560 (after benchmarks/fetch_wheels.sh)
#
# 1. install lossgraph (and the carried wheels) without network;                         ~15 s
# 2. the whole test suite on the GPU (no interpreter), every failure with a short traceback,
#    in parallel where pytest-xdist is installed, within TESTS_S seconds;                   $OUT/tests.log
# 3. examples/distributed_train.py under torchrun, one process on one GPU (NCCL);          $OUT/example.txt
#    the host time of one call (benchmarks/host_overhead.py);                               $OUT/host.txt
# 4. lossgraph bench, each case in a process of its own with a share of the time left (a case that runs
#    out keeps the columns it measured: torch.compile, the slowest to build, goes last);
#    $OUT/bench.json (every case, merged) and $OUT/bench.txt (the tables and the docs' summary table);
# 5. where case e's time goes, phase by phase and per chunk size (benchmarks/linear_breakdown.py), in the
#    LINEAR_S seconds (default 45) the benchmark leaves;                                   $OUT/linear.txt
#
# Everything is bounded by BUDGET_S (default 530 s), inside the call's limit. Knobs for a dry run on a
# CPU (no GPU needed): INSTALL=0 PYTHON=.venv/bin/python TEST_ARGS="tests/test_bench.py" CASES="a e"
# BENCH_ARGS="--device cpu --tokens 32 --vocab 256 --hidden 16 --repeats 1 --warmup 0" OUT=/tmp/session
set -uo pipefail
OUT="${OUT:-bench-results}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-530}"
TESTS_S="${TESTS_S:-210}"
LINEAR_S="${LINEAR_S:-45}"
TEST_ARGS="${TEST_ARGS:-tests}"
CASES="${CASES:-a b c d e f}"
BENCH_ARGS="${BENCH_ARGS:---repeats 10 --warmup 1}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=160
unset TRITON_INTERPRET
left() { echo $((BUDGET_S - SECONDS)); }

# 1. install
if [ "${INSTALL:-1}" = 1 ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
"$PYTHON" - <<'PY' | tee "$OUT/environment.txt"
import torch, triton
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print("card:", card, "| torch", torch.__version__, "| triton", triton.__version__)
PY

# 2. the test suite: no -x (every failure is reported), short tracebacks, a time budget
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
budget=()
if "$PYTHON" -m pytest --help 2>/dev/null | grep -q -- "--session-timeout"; then
    budget=(--session-timeout "$TESTS_S" --timeout 150)  # pytest-timeout: ends the session with a summary
fi
# shellcheck disable=SC2086  # TEST_ARGS is a list of paths and options
timeout -k 10 $((TESTS_S + 30)) "$PYTHON" -m pytest -q -p no:cacheprovider --tb=short -rfEs "${parallel[@]}" \
    "${budget[@]}" $TEST_ARGS >"$OUT/tests.log" 2>&1
echo "tests: exit $? after ${SECONDS}s" >>"$OUT/tests.log"
tail -n 25 "$OUT/tests.log"

# 3. the distributed example on one GPU: NCCL, world size 1
timeout -k 5 90 "$PYTHON" -m torch.distributed.run --nproc-per-node 1 examples/distributed_train.py --steps 21 \
    >"$OUT/example.txt" 2>&1
echo "example: exit $? after ${SECONDS}s" | tee -a "$OUT/example.txt"
grep "^step" "$OUT/example.txt"
timeout -k 5 60 "$PYTHON" benchmarks/host_overhead.py --json "$OUT/host.json" >"$OUT/host.txt" 2>&1
echo "host overhead: exit $? after ${SECONDS}s" | tee -a "$OUT/host.txt"

# 4. the benchmark, one process per case, the time left shared among the cases left
parts="$(mktemp -d)"
set -- $CASES
: >"$OUT/bench.txt"
while [ $# -gt 0 ]; do
    slot=$(( ($(left) - 15 - LINEAR_S) / $# ))
    if [ "$slot" -lt 20 ]; then
        echo "case $1: skipped, ${slot}s left for it" | tee -a "$OUT/bench.txt"
    else
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
        timeout -k 5 "$slot" "$PYTHON" -m lossgraph bench "$1" $BENCH_ARGS --json "$parts/$1.json" \
            >>"$OUT/bench.txt" 2>&1
        echo "case $1: exit $? after ${SECONDS}s (limit ${slot}s)" | tee -a "$OUT/bench.txt"
    fi
    shift
done
"$PYTHON" benchmarks/merge_bench.py "$OUT/bench.json" "$parts"/*.json | tee -a "$OUT/bench.txt"

# 5. where case e's time goes, in the time the benchmark left (LINEAR_S of it reserved)
if [ "$(left)" -gt 30 ]; then
    timeout -k 5 $(( $(left) - 10 )) "$PYTHON" benchmarks/linear_breakdown.py --json "$OUT/linear.json" \
        >"$OUT/linear.txt" 2>&1
    echo "linear breakdown: exit $? after ${SECONDS}s" | tee -a "$OUT/linear.txt"
else
    echo "linear breakdown: skipped, $(left)s left" | tee "$OUT/linear.txt"
fi
echo "session: ${SECONDS}s"
