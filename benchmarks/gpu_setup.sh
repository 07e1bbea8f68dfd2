# Sourced by the GPU scripts that take `OUT [WHEEL_DIR]` (gpu_versions.sh, gpu_decoding.sh): checks the arguments,
# makes OUT, installs the wheels of WHEEL_DIR (e.g. a newer transformers) into a private folder put first on
# PYTHONPATH, and writes OUT/environment.txt. The caller sets USAGE first; afterwards `out` holds OUT.
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $USAGE" >&2; exit 2
fi
out=$1
wheels=${2:-}
if [ -n "$wheels" ] && ! ls "$wheels"/*.whl > /dev/null 2>&1; then
    echo "WHEEL_DIR $wheels holds no .whl files" >&2; exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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
