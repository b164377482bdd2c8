#!/usr/bin/env bash
# Exercise every CUDA path once, on one GPU, in under 5 minutes:
#   bash benchmarks/gpu_check.sh
# 1. the GPU-only tests (pytest -m gpu): FP8 matmuls through scaled_mm, bitsandbytes int8/nf4
#    layers moved to CUDA, torchao float8 training;
# 2. short training runs on the GPU: bf16 autocast with an FP8 behaviour model, an int8
#    reference and an nf4 behaviour, torchao FP8 training of the policy, bf16-true with a bf16
#    behaviour, and DDP's NCCL set-up on one process (FSDP needs two GPUs);
# 3. benchmarks/precision.py on the GPU (bytes, time, drift and sync cost per precision).
# Needs the fp8 extra: pip install torch==2.13.0 -e ".[dev,fp8]". Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python - <<'EOF'
import torch

from trustregion.precision import fp8_matmul_path

assert torch.cuda.is_available(), "no CUDA device: this script checks the GPU paths"
name = torch.cuda.get_device_name()
capability = torch.cuda.get_device_capability()
print(f"device: {name}, compute capability {capability[0]}.{capability[1]}, "
      f"fp8 matmuls: {fp8_matmul_path('cuda')}")
EOF

echo "== GPU tests"
python -m pytest -q -m gpu -p no:cacheprovider tests

run() {  # run NAME CONFIG ARGS...: a short run in a scratch directory, its log in last.log
    local name="$1" config="$2"; shift 2
    echo "== $name"
    if ! (cd "$work" && trustregion fit --config "$root/examples/configs/$config" \
            --trainer.accelerator=gpu --trainer.devices=1 --trainer.max_steps=20 \
            --trainer.enable_progress_bar=false "$@" >"$work/last.log" 2>&1); then
        tail -n 40 "$work/last.log"
        echo "gpu_check: '$name' failed"
        exit 1
    fi
    grep "precision:" "$work/last.log"
}
expect_log() {  # expect_log PATTERN: the last run printed PATTERN
    grep -q "$1" "$work/last.log" || { echo "gpu_check: expected '$1' in the output"; exit 1; }
}

run "FP8 behaviour, bf16-mixed policy" fp8_behavior.yaml
if python -c "import torch, sys; sys.exit(torch.cuda.get_device_capability() < (8, 9))"; then
    expect_log "scaled_mm"
else
    expect_log "emulated"
fi
run "int8 reference, bf16 behaviour" int8_reference.yaml
expect_log "reference int8"
run "nf4 behaviour" int8_reference.yaml --model.precision.behavior=nf4
expect_log "behaviour nf4"
run "torchao FP8 policy training" quickstart.yaml --model.precision.policy=fp8 \
    --trainer.precision=bf16-mixed
expect_log "torchao float8"
run "bf16-true policy, bf16 behaviour" quickstart.yaml --trainer.precision=bf16-true \
    --model.precision.behavior=bf16
expect_log "policy bf16-true"
# One GPU holds one process: this checks DDP's NCCL set-up and collectives (the reductions of
# counts and metrics), not a gradient exchange between GPUs, and FSDP, which needs two
# processes, is left to a machine with two GPUs (trustregion fit --config
# examples/configs/fsdp.yaml --trainer.accelerator=gpu).
run "DDP over NCCL (one process)" ddp.yaml
expect_log "precision:"
expect_log "nccl"

echo "== precision benchmark on the GPU"
python benchmarks/precision.py --accelerator gpu --steps 2
echo "gpu_check: every GPU path ran"
