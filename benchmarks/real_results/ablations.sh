#!/usr/bin/env bash
# Issue 19, item 3: ablations of the CALM baseline, in one GPU call (about 7 minutes on one H200 with the defaults).
#
#   bash benchmarks/real_results/ablations.sh DATA WORK OUT
#
# DATA: the folder prepare_data.py wrote (with heldout.jsonl); WORK: the work folder (finished jobs are kept by a
# later call with the same settings); OUT: receives ablations.json (rewritten as jobs finish), ablations.md (the
# table), logs/ and ablations.log. What the arms are: python benchmarks/real_results/ablations.py --list_arms.
# The figure is drawn afterwards on a machine with matplotlib:
#   python benchmarks/real_results/plot_ablations.py OUT/ablations.json --figure ablations.png
#
# Environment: STEPS (400), PARALLEL (8), LIMIT (450: wall seconds; the script stops itself before, keeping what
# finished), ARMS (all default arms), PYTHON (python), TINY (0; 1: --tiny, a CPU check with its own small budgets).
set -u
if [ $# -ne 3 ]; then
    echo "usage: bash $0 DATA WORK OUT" >&2
    exit 2
fi
DATA=$1 WORK=$2 OUT=$3
PYTHON=${PYTHON:-python} TINY=${TINY:-0}
for file in train_ids.npy tokenizer heldout.jsonl data.json; do
    if [ ! -e "$DATA/$file" ]; then
        echo "$DATA/$file is missing: build DATA with prepare_data.py --holdout_every 40" >&2
        exit 2
    fi
done
mkdir -p "$OUT" "$WORK"
HERE=$(cd "$(dirname "$0")" && pwd)
EXTRA=()
[ "$TINY" = 1 ] && EXTRA+=(--tiny)
[ -n "${STEPS:-}" ] && EXTRA+=(--steps "$STEPS")
[ -n "${PARALLEL:-}" ] && EXTRA+=(--parallel "$PARALLEL")
[ -n "${LIMIT:-}" ] && EXTRA+=(--limit "$LIMIT")
# shellcheck disable=SC2206  # ARMS is a list
[ -n "${ARMS:-}" ] && EXTRA+=(--arms $ARMS)

start=$(date +%s)
# The script keeps to its --limit itself; this timeout (60 s later) only guards against a hang.
timeout -s INT -k 15 "$(( ${LIMIT:-450} + 60 ))" "$PYTHON" -u "$HERE/ablations.py" --data "$DATA" --work "$WORK" \
    --out "$OUT" "${EXTRA[@]}" 2>&1 | tee "$OUT/ablations.log"
rc=${PIPESTATUS[0]}
echo "ablations exit status $rc, $(( $(date +%s) - start )) s wall" | tee -a "$OUT/ablations.log"
[ -f "$WORK/ablations.json" ] && cp "$WORK/ablations.json" "$OUT/ablations.json"
exit "$rc"
