#!/usr/bin/env bash
# Issue 19, item 2: upcycling at equal compute, in one GPU call (about 7 minutes on one H200 with the defaults).
#
#   bash benchmarks/real_results/upcycle_experiment.sh DATA WORK OUT
#
# DATA: the folder prepare_data.py wrote (with heldout.jsonl); WORK: the pipeline's work folder (stages resume);
# OUT: receives results.json and upcycle_experiment.log. Three arms at equal training time, the donor's included:
# (a) Transformer for X + Y s, (b) CALM from scratch for X + Y s, (c) the Transformer's checkpoint at X s (saved
# during (a), not trained twice) upcycled into a CALM and trained for Y s. Then BrierLM over SEEDS on the held-out
# text and on WikiText-103, samples at T = 1 and 0.5, the autoencoder's accuracy and the summary table.
#
# Environment: AE_SECONDS (45), X (50), Y (50), SEEDS ("0 1 2"), LIMIT (460: seconds after which the pipeline is
# interrupted and what it finished is still copied to OUT), PYTHON (python), TINY (0; 1: --tiny, a CPU check).
set -u
if [ $# -ne 3 ]; then
    echo "usage: bash $0 DATA WORK OUT" >&2
    exit 2
fi
DATA=$1 WORK=$2 OUT=$3
AE_SECONDS=${AE_SECONDS:-45} X=${X:-50} Y=${Y:-50} SEEDS=${SEEDS:-0 1 2} LIMIT=${LIMIT:-460}
PYTHON=${PYTHON:-python} TINY=${TINY:-0}
for file in train_ids.npy tokenizer heldout.jsonl eval.jsonl data.json; do
    if [ ! -e "$DATA/$file" ]; then
        echo "$DATA/$file is missing: build DATA with prepare_data.py --holdout_every 40" >&2
        exit 2
    fi
done
mkdir -p "$OUT" "$WORK"
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=$OUT/upcycle_experiment.log
EXTRA=()
[ "$TINY" = 1 ] && EXTRA+=(--tiny)
LM_SECONDS=$("$PYTHON" -c "print($X + $Y)")

start=$(date +%s)
# shellcheck disable=SC2086  # SEEDS is a list
timeout -s INT -k 15 "$LIMIT" "$PYTHON" -u "$HERE/pipeline.py" --data "$DATA" --work "$WORK" \
    --ae_seconds "$AE_SECONDS" --lm_seconds "$LM_SECONDS" --donor_seconds "$X" --curve_every 25 \
    --seeds $SEEDS --temperatures 1.0 0.5 "${EXTRA[@]}" \
    --stages ae baseline upcycle calm eval_heldout eval samples ae_eval summary 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "pipeline exit status $rc, $(( $(date +%s) - start )) s wall" | tee -a "$LOG"
[ -f "$WORK/results.json" ] && cp "$WORK/results.json" "$OUT/results.json"
exit "$rc"
