#!/usr/bin/env bash
# The CALM generation and CUDA-graph training benchmarks under one transformers release, for comparing the two ends
# of the supported range on the same GPU (docs/RESULTS.md, "Both ends of the transformers range").
#   bash benchmarks/gpu_versions.sh OUT [WHEEL_DIR]
# Without WHEEL_DIR the machine's own transformers runs; with it, the wheels in WHEEL_DIR (e.g. transformers 5.24 and
# huggingface_hub 2.4 with their new dependencies) are installed into a private folder put first on PYTHONPATH.
# Results: OUT/environment.txt, OUT/bench_generate.json, OUT/bench_train_cudagraphs.json and the logs.
set -u
USAGE="bash benchmarks/gpu_versions.sh OUT [WHEEL_DIR]"
# shellcheck source=benchmarks/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"
python3 benchmarks/bench_generate.py --no-llama --output "$out/bench_generate.json" > "$out/bench_generate.log" 2>&1 \
    || echo "bench_generate failed: see $out/bench_generate.log"
python3 benchmarks/bench_train.py --models calm --compile-mode reduce-overhead --json "$out/bench_train_cudagraphs.json" \
    > "$out/bench_train_cudagraphs.log" 2>&1 || echo "bench_train failed: see $out/bench_train_cudagraphs.log"
tail -n 25 "$out/bench_generate.log" "$out/bench_train_cudagraphs.log"
