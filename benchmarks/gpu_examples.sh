#!/usr/bin/env bash
# The three training examples end to end on one GPU with the real presets (autoencoder.json, calm-m.json and the
# autoencoder / calm recipes, bf16), shortened to a few hundred steps, then the trained CALM loaded back through
# AutoModelForCausalLM (trust_remote_code) and sampled at two temperatures. A smoke run of the GPU path, not a
# quality run: docs/RESULTS.md ("Training examples on a GPU") records what it printed.
#   bash benchmarks/gpu_examples.sh TEXT.jsonl OUT_DIR [STEPS]
# On a CPU the same script runs the tiny presets (the tests use that): GPU=0 bash benchmarks/gpu_examples.sh ...
set -euo pipefail
usage="usage: [GPU=0|1] [PYTHON=python3] [WORK=DIR] bash benchmarks/gpu_examples.sh TEXT.jsonl OUT_DIR [STEPS]"
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "$usage" >&2; exit 2; fi
if [ ! -f "$1" ]; then echo "TEXT.jsonl '$1' is not a file; $usage" >&2; exit 2; fi
if ! [[ "${3:-300}" =~ ^[1-9][0-9]*$ ]]; then echo "STEPS must be a whole number >= 1, got '$3'" >&2; exit 2; fi
if [ "${GPU:-1}" != 0 ] && [ "${GPU:-1}" != 1 ]; then echo "GPU must be 0 (CPU, tiny presets) or 1, got '$GPU'" >&2; exit 2; fi
text=$(realpath -m "$1")
out=$(realpath -m "$2")
steps=${3:-300}
work=$(realpath -m "${WORK:-$out/work}")
mkdir -p "$out" "$work"
trap 'echo "gpu_examples.sh: a step failed (line $LINENO); its log is the newest file in $out" >&2' ERR
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, installed or not
python=${PYTHON:-python3}

if [ "${GPU:-1}" = 1 ]; then
  vocab=32000; ae=(--preset autoencoder --recipe autoencoder --block_size 2048 --gradient_accumulation_steps 1)
  lm=(--preset calm-m --recipe calm --block_size 2048 --gradient_accumulation_steps 1)
  warmup=50; check_device=cuda
else
  vocab=512; ae=(--preset tiny --recipe tiny --use_cpu true); lm=(--preset tiny --recipe tiny --use_cpu true)
  warmup=2; check_device=cpu
fi
common=(--max_steps "$steps" --warmup_steps "$warmup" --logging_steps $(( (steps + 5) / 6 )) --eval_strategy steps
        --eval_steps "$steps" --save_steps "$steps" --dataloader_num_workers 2 --disable_tqdm true)

start=$(date +%s)
$python examples/train_tokenizer.py --train_file "$text" --output_dir "$work/tokenizer" --vocab_size "$vocab" \
    > "$out/train_tokenizer.log" 2>&1
t1=$(date +%s)
$python examples/train_autoencoder.py "${ae[@]}" --tokenizer "$work/tokenizer" --train_file "$text" \
    --output_dir "$work/autoencoder" "${common[@]}" > "$out/train_autoencoder.log" 2>&1
t2=$(date +%s)
$python examples/train_calm.py "${lm[@]}" --autoencoder "$work/autoencoder" --train_file "$text" \
    --output_dir "$work/calm" "${common[@]}" > "$out/train_calm.log" 2>&1
t3=$(date +%s)
$python - "$work/calm" "$check_device" > "$out/load_and_generate.log" 2>&1 <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, device = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16 if device == "cuda" else None)
model = model.to(device).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
print(type(model).__name__, "from", folder, "K =", model.config.patch_size, "dtype", model.dtype)
inputs = tokenizer(["The history of the city"], return_tensors="pt").to(device)
for temperature in (1.0, 0.5):
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=32, do_sample=True, temperature=temperature)
    print(f"T={temperature}:", repr(tokenizer.decode(out[0], skip_special_tokens=True)))
EOF
t4=$(date +%s)
printf '{"tokenizer_s": %d, "autoencoder_s": %d, "calm_s": %d, "load_and_generate_s": %d, "total_s": %d}\n' \
    $((t1 - start)) $((t2 - t1)) $((t3 - t2)) $((t4 - t3)) $((t4 - start)) > "$out/timings.json"
cp "$work/autoencoder/README.md" "$out/autoencoder_card.md"
cp "$work/calm/README.md" "$out/calm_card.md"
cat "$out/timings.json"
