#!/bin/bash
# The checks that need a GPU, run by hand on a CUDA machine with redis-server on PATH and pr_loader installed
# with its test extras: the CUDA and pin_memory tests, the whole suite, then the benchmarks whose numbers
# the README gives for such a machine ("On a GPU machine"). Each step is bounded; logs go to $LOGS
# (default gpu-checks/).
set -u
cd "$(dirname "$0")/.."
logs=${LOGS:-gpu-checks}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__)" || exit 1
step() { echo "=== $(date +%T) $1"; }
step "CUDA and pin_memory tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/rollout/test_engines.py tests/test_batch_memory.py \
    tests/loader/test_linked_mode.py tests/loader/test_parity.py tests/test_linked.py tests/test_rows.py \
    tests/test_protocol.py 2>&1 | tee "$logs/gpu_tests.log" | tail -5
step "whole suite"
timeout 300 python3 -m pytest -q -p no:cacheprovider -n "$(( $(nproc) * 3 / 4 ))" 2>&1 \
    | tee "$logs/suite.log" | tail -5
step "partial rollout on the GPU"
timeout 150 python3 benchmarks/bench_rollout.py --only torch --device cuda --torch-scale 4 2>&1 \
    | tee "$logs/bench_rollout_cuda.log" | tail -4
step "pinned collate"
timeout 60 python3 benchmarks/bench_batch_memory.py 2>&1 | tee "$logs/bench_batch_memory.log"
step "loader"
timeout 200 python3 benchmarks/bench_loader.py 2>&1 | tee "$logs/bench_loader.log" | tail -40
step "store"
timeout 60 python3 benchmarks/bench_store.py 2>&1 | tee "$logs/bench_store.log" | tail -14
