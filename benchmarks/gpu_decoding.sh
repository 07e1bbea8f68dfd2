#!/usr/bin/env bash
# Issue 20 (decoding near the hardware) in one GPU call: the CUDA-graph tests, the per-part profile of a decoding
# step and the generation benchmark, under the machine's transformers or, with WHEEL_DIR, the wheels in it.
#   bash benchmarks/gpu_decoding.sh OUT [WHEEL_DIR]
# Environment: BENCH_ARGS (extra bench_generate.py arguments, e.g. "--no-llama --calm-modes cudagraph"),
# PROFILE_ARGS (extra profile_decoding.py arguments), SKIP_BENCH=1 / SKIP_PROFILE=1 / SKIP_TESTS=1.
# Results: OUT/environment.txt, OUT/tests.log, OUT/profile_decoding.{json,log}, OUT/bench_generate.{json,log}.
set -u
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash benchmarks/gpu_decoding.sh OUT [WHEEL_DIR]" >&2; exit 2
fi
out=$1
wheels=${2:-}
if [ -n "$wheels" ] && ! ls "$wheels"/*.whl > /dev/null 2>&1; then
    echo "WHEEL_DIR $wheels holds no .whl files" >&2; exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -n "$wheels" ]; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_modeling_calm_graphs.py > "$out/tests.log" 2>&1 \
        || echo "tests failed: see $out/tests.log"
    tail -n 3 "$out/tests.log"
fi
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
    # shellcheck disable=SC2086  # PROFILE_ARGS is a list of arguments
    python3 benchmarks/profile_decoding.py --output "$out/profile_decoding.json" ${PROFILE_ARGS:-} \
        > "$out/profile_decoding.log" 2>&1 || echo "profile failed: see $out/profile_decoding.log"
    tail -n 40 "$out/profile_decoding.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    python3 benchmarks/bench_generate.py --output "$out/bench_generate.json" ${BENCH_ARGS:-} \
        > "$out/bench_generate.log" 2>&1 || echo "bench_generate failed: see $out/bench_generate.log"
    tail -n 45 "$out/bench_generate.log"
fi
