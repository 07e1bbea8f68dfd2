#!/usr/bin/env bash
# The CALM generation and CUDA-graph training benchmarks under one transformers release, for comparing the two ends
# of the supported range on the same GPU (docs/RESULTS.md, "Both ends of the transformers range").
#   bash benchmarks/gpu_versions.sh OUT [WHEEL_DIR]
# Without WHEEL_DIR the machine's own transformers runs; with it, the wheels in WHEEL_DIR (e.g. transformers 5.24 and
# huggingface_hub 2.4 with their new dependencies) are installed into a private folder put first on PYTHONPATH.
# Results: OUT/environment.txt, OUT/bench_generate.json, OUT/bench_train_cudagraphs.json and the logs.
set -u
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash benchmarks/gpu_versions.sh OUT [WHEEL_DIR]" >&2; exit 2
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
    python3 -c "import sys, torch, transformers, huggingface_hub; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'huggingface_hub', \
huggingface_hub.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
python3 benchmarks/bench_generate.py --no-llama --output "$out/bench_generate.json" > "$out/bench_generate.log" 2>&1 \
    || echo "bench_generate failed: see $out/bench_generate.log"
python3 benchmarks/bench_train.py --models calm --compile-mode reduce-overhead --json "$out/bench_train_cudagraphs.json" \
    > "$out/bench_train_cudagraphs.log" 2>&1 || echo "bench_train failed: see $out/bench_train_cudagraphs.log"
tail -n 25 "$out/bench_generate.log" "$out/bench_train_cudagraphs.log"
