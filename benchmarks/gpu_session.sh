#!/usr/bin/env bash
# One GPU session in one command: the GPU's name and clocks, the C++ extension built in place, both GPU
# benchmarks (bench_materialise_gpu.py, bench_block_norms_gpu.py), then the Triton tests compiled on CUDA
# (TRITON_INTERPRET=0: tests/triton and tests/test_ops.py). Each step has its own time limit, so a slow one
# cannot take the others' results with it. Run from the repository root on a machine with a CUDA GPU:
#
#     OUT=gpu-run bash benchmarks/gpu_session.sh
#     python benchmarks/report.py gpu-run/gpu.json --name gpu && python benchmarks/report.py gpu-run/gpu_norms.json --name gpu_norms
#
# The report names its folder after the GPU (benchmarks/results/<gpu>/).
set -uo pipefail
OUT=${OUT:-gpu-run}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

step() {  # step NAME SECONDS COMMAND...: the command's output in $OUT/NAME.log, its last lines here
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
    tail -n "${TAIL:-4}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
DUAT_BUILD_JOBS=$(nproc) step build "${BUILD_S:-150}" $PY setup.py build_ext --inplace
$PY -c "import duat_kernels as dk; print('C++ kernels:', dk.cpu_capability())" | tee -a "$OUT/gpu.txt"
step materialise "${MATERIALISE_S:-150}" $PY -m pytest -q -p no:cacheprovider benchmarks/bench_materialise_gpu.py \
    --benchmark-json="$OUT/gpu.json"
step block_norms "${NORMS_S:-90}" $PY -m pytest -q -p no:cacheprovider benchmarks/bench_block_norms_gpu.py \
    --benchmark-json="$OUT/gpu_norms.json"
TAIL=12 step tests "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider ${PYTEST_JOBS:+-n $PYTEST_JOBS} tests/triton \
    tests/test_ops.py
