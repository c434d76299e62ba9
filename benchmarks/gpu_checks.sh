#!/usr/bin/env bash
# The GPU's checks and figures in one call, from the repository root on a CUDA machine:
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]      (default: $OUT, else benchmarks/results)
#
# 1. the tests that need a GPU: the Triton kernels compiled for it, graphed decode steps against
#    plain ones, the graphed engine, the vision tower's graph;
# 2. `run` for `real` (Qwen-VL-Chat's shapes, random weights) in bf16: the fast path (a Decoder
#    in mode "auto": the Triton backend's step replayed as a CUDA graph) against the baseline
#    (mode "plain", the "torch" backend), which must choose the same greedy tokens;
# 3. `gpu_profile`: products, settings sweeps, attention, kernel breakdowns, and the step under
#    the device's settings against the sweeps' pick, in turns;
# 4. `tuned`: the quickest settings of that profile, as the device's settings file (to copy to
#    src/qwenvl/decode/configs/ when it is quicker than the settings there);
# 5. `run` for `tiny` (small shapes: Python and launch overheads dominate).
# Everything printed goes to OUTDIR/checks.log too, records to OUTDIR. Each step has its own time
# limit and runs when an earlier one failed; the package is used from src/ (no install).
set -u -o pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1
    echo "== $name: exit $?"
}

exec > >(tee -a "$out/checks.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
"$python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
kind=$("$python" -c 'from benchmarks.common import device_kind; print(device_kind("cuda"))')
settings=$("$python" -c 'import torch; from qwenvl.decode.settings import config_path; print(config_path(torch.cuda.get_device_name()).name)')

step tests 150 "$python" -m pytest -p no:cacheprovider -q tests/test_kernels_on_gpu.py tests/test_vision_graphs.py \
    tests/test_decoder.py tests/test_engine.py -k "gpu or cuda or graph"
step "run_real_$kind" 180 "$python" -m benchmarks.run --config real --device cuda --dtypes bf16 \
    --json "$out/run_real_$kind.json"
step "gpu_profile_real_$kind" 300 "$python" -m benchmarks.gpu_profile --json "$out/gpu_profile_real_$kind.json"
step tuned 60 "$python" -m benchmarks.tuned "$out/gpu_profile_real_$kind.json" --json "$out/$settings"
step "run_tiny_$kind" 120 "$python" -m benchmarks.run --config tiny --device cuda --batch-sizes 8 \
    --json "$out/run_tiny_$kind.json"
date -u
