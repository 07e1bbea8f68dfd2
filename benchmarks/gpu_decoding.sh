#!/usr/bin/env bash
# Issue 20 (decoding near the hardware) in one GPU call: the CUDA-graph and fused-kernel tests, the projection +
# argmax benchmark, the per-part profile of a decoding step and the generation benchmark, under the machine's
# transformers or, with WHEEL_DIR, the wheels in it.
#   bash benchmarks/gpu_decoding.sh OUT [WHEEL_DIR]
# Environment: BENCH_ARGS (extra bench_generate.py arguments, e.g. "--no-llama --calm-modes cudagraph"),
# PROFILE_ARGS (extra profile_decoding.py arguments), KERNEL_ARGS (extra bench_projection_argmax.py arguments),
# SKIP_BENCH=1 / SKIP_PROFILE=1 / SKIP_TESTS=1 / SKIP_KERNEL=1.
# Results: OUT/environment.txt, OUT/tests.log, OUT/bench_projection_argmax.{json,log}, OUT/profile_decoding.{json,log},
# OUT/bench_generate.{json,log}.
set -u
USAGE="bash benchmarks/gpu_decoding.sh OUT [WHEEL_DIR]"
# shellcheck source=benchmarks/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_modeling_calm_graphs.py tests/test_modeling_calm_kernels.py \
        > "$out/tests.log" 2>&1 \
        || echo "tests failed: see $out/tests.log"
    tail -n 3 "$out/tests.log"
fi
if [ "${SKIP_KERNEL:-0}" != 1 ]; then
    # shellcheck disable=SC2086  # KERNEL_ARGS is a list of arguments
    python3 benchmarks/bench_projection_argmax.py --output "$out/bench_projection_argmax.json" ${KERNEL_ARGS:-} \
        > "$out/bench_projection_argmax.log" 2>&1 \
        || echo "bench_projection_argmax failed: see $out/bench_projection_argmax.log"
    tail -n 30 "$out/bench_projection_argmax.log"
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
