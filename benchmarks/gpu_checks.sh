#!/usr/bin/env bash
# Issue 6's GPU figures in one call of a few minutes, from the repository root on a CUDA machine:
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]      (default: $OUT, else benchmarks/results)
#
# 0. the tests that need a GPU (the Triton kernels compiled for it, CUDA-graph steps with and
#    without them, the graphed engine, the vision tower's graph and the prefill that does not
#    wait for it); the figures below check the fast paths' greedy tokens too;
# 1. `real` (the Qwen-VL-Chat shapes, random weights) in bf16 (fp32's figures: session 10's
#    records, results/gpu.md): the fast path is the decode step with fused_decode's kernels
#    (batch-1 products through its matvec), captured as a CUDA graph;
# 2. gpu_profile: matrix-vector bandwidth, decode attention (SDPA and flash decoding's share
#    counts; keys a turn, warps and shares), matvec's configs swept in a whole step, the kernels
#    launched early against as usual, and kernel breakdowns of encode, prefill and decode;
# 3. benchmarks.tuned: the quickest of the settings the profile timed (matvec's configs, the
#    attention's keys a turn, warps and shares, early launch), and `real` in bf16 with them;
# 4. `real` in bf16 with the kernels launched as usual (--no-dependent-launch), and with the
#    batch-1 products through cuBLAS, for the ratios to 1;
# 5. `tiny` (small shapes: Python and launch overheads dominate).
# (On record from session 10, results/gpu.md: `real` in fp32, without the fused kernels, with SDPA
# decode attention, and its checkpoint's load time.)
# Everything printed also goes to OUTDIR/checks.log, records (JSON) to OUTDIR: eight files. Each
# step has its own time limit and goes on when an earlier one fails, so one call brings back
# every figure it can; the most wanted come first. Needs torch with CUDA, pytest, tiktoken,
# pillow, safetensors, transformers; the package is used from src/ (no install).
set -u -o pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS ARGS...: one benchmarks.run; its record goes to $out/NAME.json
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$python" -m benchmarks.run "$@" --json "$out/$name.json" 2>&1
    echo "== $name: exit $?"
}

exec > >(tee -a "$out/checks.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
"$python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

echo "== GPU tests (limit 150s)"
timeout 150 "$python" -m pytest -p no:cacheprovider -q tests/test_kernels_on_gpu.py \
    tests/test_static_decode.py::test_cuda_graph_steps_equal_plain_steps \
    tests/test_static_decode.py::test_generation_reads_each_step_off_the_gpu_while_the_next_runs \
    tests/test_engine.py::test_graphed_engine_equals_the_plain_one tests/test_vision_graphs.py 2>&1
echo "== GPU tests: exit $?"
step run_real_cuda 180 --config real --device cuda --dtypes bf16
echo "== gpu_profile_real (limit 300s)"
timeout 300 "$python" -m benchmarks.gpu_profile --json "$out/gpu_profile_real.json" 2>&1
echo "== gpu_profile_real: exit $?"
echo "== tuned settings"
"$python" -m benchmarks.tuned "$out/gpu_profile_real.json" --json "$out/tuned_settings.json" 2>&1
step run_real_cuda_tuned 120 --config real --device cuda --dtypes bf16 --batch-sizes 32 \
    --settings "$out/tuned_settings.json"
step run_real_cuda_usual_launch 90 --config real --device cuda --no-dependent-launch --dtypes bf16 --batch-sizes 32
step run_real_cuda_no_matvec 90 --config real --device cuda --no-matvec --dtypes bf16 --batch-sizes 32
step run_tiny_cuda 120 --config tiny --device cuda --batch-sizes 8
date -u
