#!/usr/bin/env bash
# The GPU check as one script, a few minutes on one GPU, nothing downloaded (bench/gpu_check.py):
#   1. resnet50 SwAV with the paper's crops (2x224 + 6x96) at bf16, a few hundred steps of
#      swav_core's trainer on generated images, once decoding with PIL and once from the
#      prepared copy with the crops made on the GPU: images/s, its ratio to the compute
#      bound, GPU busy fraction, peak GPU memory, loss curve;
#   2. with 2 or more GPUs, 2 NCCL ranks == 1 process (tests/core/test_trainer.py: gloo, CPU).
# Results are printed and written as JSON under --out (default var/gpu_check).
#
#   bash bench/gpu_check.sh                     # on a GPU machine with .venv
#   docker compose run --rm --no-deps worker-gpu bash bench/gpu_check.sh --out /tmp/gpu_check
#   bash bench/gpu_check.sh --tiny              # on a CPU: tiny model, gloo; the script runs
# Other options go to the throughput check, e.g. --steps 500 --batch 256 --workers 4
# --data-path prepared.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
[[ -x $python ]] || python=python  # the worker image has its venv on PATH
out=var/gpu_check
tiny=()
extra=()
while (($#)); do
    case $1 in
        --tiny) tiny=(--tiny); shift ;;
        --out) out=$2; shift 2 ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done
mkdir -p "$out" 2>/dev/null || out=${TMPDIR:-/tmp}/gpu_check  # /app is read-only in the image

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if ((${#tiny[@]} == 0 && gpus == 0)); then
    echo "gpu_check: no CUDA device; on a CPU run: bash $0 --tiny" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
fi

status=0
"$python" bench/gpu_check.py throughput "${tiny[@]}" --out "$out" "${extra[@]}" || status=1
if ((${#tiny[@]} || gpus >= 2)); then
    "$python" bench/gpu_check.py equivalence "${tiny[@]}" --out "$out" || status=1
else
    echo "equivalence: skipped, it needs 2 GPUs (found $gpus)"
fi
echo "gpu_check: $( ((status == 0)) && echo PASS || echo FAIL ); results in $out"
exit $status
