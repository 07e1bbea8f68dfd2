#!/usr/bin/env bash
# The project's GPU benchmarks, one after the other on an otherwise idle GPU (the figures in
# docs/RESULTS.md). Results and logs go to the folder given as the first argument (default bench_results/).
#   bash benchmarks/gpu_benchmarks.sh bench_results
set -u
out=${1:-bench_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$out/environment.txt" 2>&1
python3 benchmarks/bench_generate.py --output "$out/bench_generate.json" > "$out/bench_generate.log" 2>&1
python3 benchmarks/bench_train.py --json "$out/bench_train.json" > "$out/bench_train.log" 2>&1
python3 benchmarks/bench_train.py --compile-mode reduce-overhead --json "$out/bench_train_cudagraphs.json" \
    > "$out/bench_train_cudagraphs.log" 2>&1
python3 benchmarks/bench_trainer.py --compile-mode reduce-overhead --json "$out/bench_trainer_cudagraphs.json" \
    > "$out/bench_trainer_cudagraphs.log" 2>&1
date -u +%Y-%m-%dT%H:%M:%SZ > "$out/finished.txt"
