#!/usr/bin/env bash
# The several-GPU runs of issue 17 on 2 GPUs of one host, NCCL, NVLink multicast off. Not yet run (no multi-GPU
# machine so far); docs/RESULTS.md ("Several GPUs") says what the CPU tests cover and where these results go.
#   bash benchmarks/gpu_multi.sh TEXT.jsonl OUT_DIR [STEPS]
# Runs, each logged to OUT_DIR/<name>.log (a failing run is recorded in OUT_DIR/status.txt, the others go on):
#   tokenizer, autoencoder (1 GPU)            the inputs of the CALM runs
#   ae_ddp1 / ae_ddp2                         autoencoder: 1 GPU with accumulation 2 vs torchrun 2 GPUs (DDP, bf16)
#   calm_ddp1 / calm_ddp2                     CALM-M: the same comparison (throughput, peak memory, loss)
#   fsdp_l, fsdp_l_resume, fsdp_l_load        CALM-L under configuration/accelerate/fsdp.yaml on 2 GPUs: STEPS/2
#                                             steps, resumed from the checkpoint to STEPS, then loaded on 1 GPU
#                                             through AutoModelForCausalLM and sampled
#   calm_ddp2_reduce_overhead                 torch_compile_mode=reduce-overhead under DDP (works or fails clearly)
#   brier1 / brier2                           examples/evaluate_brierlm.py on 1 and 2 processes: equal numbers
# DRY_RUN=1 prints the commands instead of running them (the tests check the arguments that way on a CPU).
set -uo pipefail
usage="usage: [DRY_RUN=0|1] [PYTHON=python3] bash benchmarks/gpu_multi.sh TEXT.jsonl OUT_DIR [STEPS]"
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "$usage" >&2; exit 2; fi
if [ ! -f "$1" ]; then echo "TEXT.jsonl '$1' is not a file; $usage" >&2; exit 2; fi
steps=${3:-200}
if ! [[ "$steps" =~ ^[1-9][0-9]*$ ]] || [ "$steps" -lt 2 ] || [ $((steps % 2)) -ne 0 ]; then
  echo "STEPS must be an even whole number >= 2 (the FSDP run saves at STEPS/2 and resumes), got '$steps'" >&2; exit 2
fi
dry=${DRY_RUN:-0}
if [ "$dry" != 0 ] && [ "$dry" != 1 ]; then echo "DRY_RUN must be 0 or 1, got '$dry'" >&2; exit 2; fi
python=${PYTHON:-python3}
if [ "$dry" = 0 ]; then
  gpus=$($python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$gpus" -lt 2 ]; then echo "gpu_multi.sh needs 2 CUDA GPUs, found $gpus (DRY_RUN=1 prints the commands)" >&2; exit 2; fi
fi
text=$(realpath -m "$1")
out=$(realpath -m "$2")
work="$out/work"
half=$((steps / 2))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, installed or not
mkdir -p "$out" "$work"
: > "$out/status.txt"

# run NAME CMD...: runs CMD into OUT/NAME.log and records "NAME rc=.. seconds=.." in OUT/status.txt.
run() {
  local name=$1; shift
  if [ "$dry" = 1 ]; then echo "$name: $*"; return 0; fi
  local start rc
  start=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$out/status.txt"
  return 0
}
torchrun=($python -m torch.distributed.run --standalone --nproc_per_node 2)
common=(--max_steps "$steps" --warmup_steps 10 --logging_steps 10 --save_strategy no --eval_strategy no
        --block_size 2048 --per_device_train_batch_size 4 --disable_tqdm true --dataloader_num_workers 2
        --seed 0 --data_seed 0)
ae=(--preset autoencoder --recipe autoencoder --tokenizer "$work/tokenizer" --train_file "$text")
lm=(--preset calm-m --recipe calm --autoencoder "$work/autoencoder" --train_file "$text")

run tokenizer $python examples/train_tokenizer.py --train_file "$text" --output_dir "$work/tokenizer" \
    --vocab_size 32000
run autoencoder $python examples/train_autoencoder.py "${ae[@]}" "${common[@]}" --output_dir "$work/autoencoder"

# 1. DDP scaling: 2 GPUs x accumulation 1 against 1 GPU x accumulation 2, the same samples per step.
run ae_ddp1 env CUDA_VISIBLE_DEVICES=0 $python examples/train_autoencoder.py "${ae[@]}" "${common[@]}" \
    --gradient_accumulation_steps 2 --output_dir "$work/ae_ddp1"
run ae_ddp2 "${torchrun[@]}" examples/train_autoencoder.py "${ae[@]}" "${common[@]}" \
    --gradient_accumulation_steps 1 --output_dir "$work/ae_ddp2"
run calm_ddp1 env CUDA_VISIBLE_DEVICES=0 $python examples/train_calm.py "${lm[@]}" "${common[@]}" \
    --gradient_accumulation_steps 2 --output_dir "$work/calm_ddp1"
run calm_ddp2 "${torchrun[@]}" examples/train_calm.py "${lm[@]}" "${common[@]}" \
    --gradient_accumulation_steps 1 --output_dir "$work/calm_ddp2"

# 2. FSDP, CALM-L: half the steps with a checkpoint, resumed to the end, then the final folder on one GPU.
fsdp=($python -m accelerate.commands.launch --config_file configuration/accelerate/fsdp.yaml --num_processes 2)
fsdp_args=(--preset calm-l --recipe calm --autoencoder "$work/autoencoder" --train_file "$text" --block_size 2048
           --per_device_train_batch_size 2 --logging_steps 10 --warmup_steps 10 --eval_strategy no
           --save_strategy steps --save_steps "$half" --disable_tqdm true --seed 0 --data_seed 0
           --output_dir "$work/fsdp_l")
run fsdp_l "${fsdp[@]}" examples/train_calm.py "${fsdp_args[@]}" --max_steps "$half"
run fsdp_l_resume "${fsdp[@]}" examples/train_calm.py "${fsdp_args[@]}" --max_steps "$steps" \
    --resume_from_checkpoint "$work/fsdp_l/checkpoint-$half"
run fsdp_l_load env CUDA_VISIBLE_DEVICES=0 $python -c "
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
print(type(model).__name__, sum(p.numel() for p in model.parameters()), 'parameters')
ids = tokenizer(['The history of the city'], return_tensors='pt').to('cuda')
torch.manual_seed(0)
print(repr(tokenizer.decode(model.generate(**ids, max_new_tokens=32, do_sample=True)[0])))
" "$work/fsdp_l"

# 3. CUDA graphs under DDP.
run calm_ddp2_reduce_overhead "${torchrun[@]}" examples/train_calm.py "${lm[@]}" "${common[@]}" \
    --torch_compile true --torch_compile_mode reduce-overhead --output_dir "$work/calm_ddp2_reduce_overhead"

# 4. Distributed BrierLM: 1 and 2 processes, the same seeds and batching, the same numbers.
brier=(examples/evaluate_brierlm.py --model "$work/calm_ddp2" --eval_file "$text" --block_size 1024
       --seeds 0 1 2 --batch_size 8 --dtype bfloat16 --max_blocks 256)
run brier1 env CUDA_VISIBLE_DEVICES=0 $python "${brier[@]}" --output "$out/brier1.json"
run brier2 "${torchrun[@]}" "${brier[@]}" --output "$out/brier2.json"
if [ "$dry" = 0 ]; then
  $python - "$out" "$work" > "$out/summary.json" <<'EOF'
import json, sys
from pathlib import Path

out, work = Path(sys.argv[1]), Path(sys.argv[2])
summary = {}
for name in ("ae_ddp1", "ae_ddp2", "calm_ddp1", "calm_ddp2", "calm_ddp2_reduce_overhead", "fsdp_l"):
    state = work / name / "trainer_state.json"
    if state.exists():
        history = json.loads(state.read_text())["log_history"]
        summary[name] = {"losses": [e["loss"] for e in history if "loss" in e], "final": history[-1]}
for name in ("brier1", "brier2"):
    report = out / f"{name}.json"
    if report.exists():
        summary[name] = {k: json.loads(report.read_text())[k] for k in ("per_seed", "num_positions", "seconds")}
if "brier1" in summary and "brier2" in summary:
    summary["brier_equal"] = summary["brier1"]["per_seed"] == summary["brier2"]["per_seed"]
print(json.dumps(summary, indent=2))
EOF
  cat "$out/status.txt"
fi
